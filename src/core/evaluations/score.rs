//! Scores of versions on a dataset from their predictions: accuracy, corrections, changes, per class, confusions.

use super::*;
use utoipa::ToSchema;

/// The most frequent confusions reported per version.
pub(super) const CONFUSIONS: usize = 10;

/// One model's top-1 classes on a dataset: on its images (a pair's originals) and, for pairs, on the
/// transformed copies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Predictions {
    pub images: Vec<u32>,
    pub transformed: Option<Vec<u32>>,
}

/// One version's scores. Shares are fractions of the scored images; `errors_corrected` is a percentage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VersionScore {
    pub version: u32,
    pub baseline: bool,
    /// Images (pairs) scored: those whose label is not excluded.
    pub images: u64,
    /// Top-1 accuracy on the images (a pair's originals); null without labels.
    pub accuracy: Option<f64>,
    /// On the transformed images; pairs only.
    pub transformed_accuracy: Option<f64>,
    /// 100 * max((E_base - E) / E_base, -1), E the errors on the transformed images (pairs) or the images
    /// (labelled); null without labels or when the baseline makes no error.
    pub errors_corrected: Option<f64>,
    /// Share of images (a pair's originals) whose top-1 differs from the baseline's.
    pub changed: Option<f64>,
    /// The same on the transformed images; pairs only.
    pub transformed_changed: Option<f64>,
    /// By label: scored images, correct top-1s on them, and on their transformed copies (pairs).
    pub per_class: BTreeMap<u32, ClassScore>,
    /// The most frequent wrong (label, predicted) pairs, on the images that `errors_corrected` counts.
    pub confusions: Vec<Confusion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClassScore {
    pub images: u64,
    pub correct: u64,
    pub transformed_correct: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Confusion {
    pub label: u32,
    pub predicted: u32,
    pub count: u64,
}

/// Scores each run (the baseline first) against the baseline over the images whose label is not in
/// `excluded`; without labels, the baseline's top-1 stands for the label when excluding. Every run and
/// `labels` must cover the same images.
pub fn score(
    labels: Option<&[u32]>,
    excluded: &BTreeSet<u32>,
    runs: &[(u32, Predictions)],
) -> Result<Vec<VersionScore>, String> {
    let Some((_, base)) = runs.first() else { return Ok(Vec::new()) };
    let count = base.images.len();
    let consistent =
        runs.iter().all(|(_, p)| p.images.len() == count && p.transformed.as_ref().is_none_or(|t| t.len() == count))
            && labels.is_none_or(|l| l.len() == count)
            && runs.iter().all(|(_, p)| p.transformed.is_some() == base.transformed.is_some());
    if !consistent {
        return Err("the predictions do not cover the same images".into());
    }
    let scored: Vec<usize> =
        (0..count).filter(|&i| !excluded.contains(&labels.map_or(base.images[i], |l| l[i]))).collect();
    let share = |matching: usize| (!scored.is_empty()).then(|| matching as f64 / scored.len() as f64);
    let counted = |test: &dyn Fn(usize) -> bool| scored.iter().filter(|&&i| test(i)).count();
    // The images whose errors `errors_corrected` and `confusions` count.
    let judged = |p: &Predictions| p.transformed.clone().unwrap_or_else(|| p.images.clone());
    let errors = |predicted: &[u32]| labels.map(|l| counted(&|i| predicted[i] != l[i]));
    let base_judged = judged(base);
    let base_errors = errors(&base_judged);
    let mut scores = Vec::with_capacity(runs.len());
    for (position, (version, p)) in runs.iter().enumerate() {
        let judged = judged(p);
        let errors_corrected = match (base_errors, errors(&judged)) {
            (Some(before), Some(after)) if before > 0 => {
                Some(100.0 * ((before as f64 - after as f64) / before as f64).max(-1.0))
            }
            _ => None,
        };
        let mut per_class = BTreeMap::new();
        let mut confusions: HashMap<(u32, u32), u64> = HashMap::new();
        if let Some(labels) = labels {
            for &i in &scored {
                let class = per_class.entry(labels[i]).or_insert(ClassScore {
                    images: 0,
                    correct: 0,
                    transformed_correct: p.transformed.as_ref().map(|_| 0),
                });
                class.images += 1;
                class.correct += u64::from(p.images[i] == labels[i]);
                if let (Some(correct), Some(transformed)) = (&mut class.transformed_correct, &p.transformed) {
                    *correct += u64::from(transformed[i] == labels[i]);
                }
                if judged[i] != labels[i] {
                    *confusions.entry((labels[i], judged[i])).or_default() += 1;
                }
            }
        }
        let mut confusions: Vec<Confusion> =
            confusions.into_iter().map(|((label, predicted), count)| Confusion { label, predicted, count }).collect();
        confusions
            .sort_by(|a, b| b.count.cmp(&a.count).then(a.label.cmp(&b.label)).then(a.predicted.cmp(&b.predicted)));
        confusions.truncate(CONFUSIONS);
        scores.push(VersionScore {
            version: *version,
            baseline: position == 0,
            images: scored.len() as u64,
            accuracy: labels.and_then(|l| share(counted(&|i| p.images[i] == l[i]))),
            transformed_accuracy: labels
                .zip(p.transformed.as_ref())
                .and_then(|(l, t)| share(counted(&|i| t[i] == l[i]))),
            errors_corrected,
            changed: share(counted(&|i| p.images[i] != base.images[i])),
            transformed_changed: p
                .transformed
                .as_ref()
                .zip(base.transformed.as_ref())
                .and_then(|(t, b)| share(counted(&|i| t[i] != b[i]))),
            per_class,
            confusions,
        });
    }
    Ok(scores)
}
