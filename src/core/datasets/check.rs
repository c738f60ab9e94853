//! Validation of a dataset upload: kinds, labels and every image decoded within the limits.

use super::*;

/// The dataset's kind and items, once its parts agree with its kind and its labels are class indices,
/// one per image. No image is decoded here.
pub(super) fn check(parts: DatasetParts, max_images: usize) -> Result<(DatasetKind, Vec<DatasetItem>), CoreError> {
    let kind = DatasetKind::parse(parts.kind.as_deref())?;
    let (images, transformed): (Vec<Bytes>, Vec<Option<Bytes>>) = if kind == DatasetKind::Pairs {
        if !parts.images.is_empty() {
            return Err(invalid("a pairs dataset takes 'original' and 'transformed' images, not 'image' ones"));
        }
        if parts.originals.len() != parts.transformed.len() {
            return Err(invalid(format!(
                "a pairs dataset needs one 'transformed' image per 'original' one, got {} originals and {} transformed",
                parts.originals.len(),
                parts.transformed.len()
            )));
        }
        (parts.originals, parts.transformed.into_iter().map(Some).collect())
    } else {
        if !parts.originals.is_empty() || !parts.transformed.is_empty() {
            return Err(invalid(format!(
                "a {kind} dataset takes 'image' images; 'original' and 'transformed' are for pairs"
            )));
        }
        let count = parts.images.len();
        (parts.images, vec![None; count])
    };
    let what = if kind == DatasetKind::Pairs { "pairs" } else { "images" };
    if images.is_empty() {
        return Err(invalid(format!("the dataset is empty: give at least one of its {what}")));
    }
    if images.len() > max_images {
        return Err(invalid(format!(
            "the dataset has {} {what}, over the limit of {max_images} (--max-dataset-images)",
            images.len()
        )));
    }
    let labels = labels(kind, parts.labels, images.len())?;
    let items = images
        .into_iter()
        .zip(transformed)
        .zip(labels)
        .map(|((image, transformed), label)| DatasetItem { image, transformed, label })
        .collect();
    Ok((kind, items))
}

/// One label per image for a labelled or pairs dataset, none for an unlabelled one.
pub(super) fn labels(kind: DatasetKind, labels: Option<Value>, count: usize) -> Result<Vec<Option<u32>>, CoreError> {
    let values = match (kind, labels) {
        (DatasetKind::Unlabelled, None) => return Ok(vec![None; count]),
        (DatasetKind::Unlabelled, Some(_)) => {
            return Err(invalid("an unlabelled dataset takes no labels; make it labelled to give them"))
        }
        (_, None) => {
            return Err(invalid(format!(
                "a {kind} dataset needs 'labels': a JSON array of class indices, one per image"
            )))
        }
        (_, Some(Value::Array(values))) => values,
        (_, Some(other)) => return Err(invalid(format!("labels must be a JSON array of class indices, got {other}"))),
    };
    if values.len() != count {
        let what = if kind == DatasetKind::Pairs { "pairs" } else { "images" };
        return Err(invalid(format!(
            "there are {} labels for {count} {what}: give one label per item, in order",
            values.len()
        )));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            value.as_u64().filter(|&label| label < u64::from(LABEL_BOUND)).map(|label| Some(label as u32)).ok_or_else(
                || {
                    invalid(format!(
                        "labels[{i}] must be a class index, an integer from 0 to {}, got {value}",
                        LABEL_BOUND - 1
                    ))
                },
            )
        })
        .collect()
}

/// Decodes the items numbered from `first`.
pub(super) fn validate_chunk(items: &[DatasetItem], first: usize, limits: DecodeLimits) -> Result<(), CoreError> {
    for (j, item) in items.iter().enumerate() {
        let index = first + j;
        let Some(transformed) = &item.transformed else {
            decode(&item.image, limits).map_err(|e| invalid(format!("image {index}: {e}")))?;
            continue;
        };
        let original = decode(&item.image, limits).map_err(|e| invalid(format!("pair {index}: the original: {e}")))?;
        let transformed =
            decode(transformed, limits).map_err(|e| invalid(format!("pair {index}: the transformed image: {e}")))?;
        if (original.width(), original.height()) != (transformed.width(), transformed.height()) {
            return Err(invalid(format!(
                "pair {index}: the transformed image is {}x{} but the original is {}x{}: a pair must be the same size",
                transformed.width(),
                transformed.height(),
                original.width(),
                original.height()
            )));
        }
    }
    Ok(())
}
