//! Image decoding with limits, and preprocessing into the network's input layout. Pure CPU work on
//! plain buffers: no tensors here, so it can run on any thread.

pub mod concept;
mod preprocess;
mod resample;

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Luma};
use thiserror::Error;

pub use preprocess::{InputTensor, Preprocessing};

#[derive(Debug, Clone, Error)]
pub enum ImageError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("unrecognised image format: expected JPEG, PNG, WebP, BMP or GIF")]
    UnsupportedFormat,
    #[error("the image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooManyPixels { width: u64, height: u64, pixels: u64, limit: u64 },
    #[error("the image could not be decoded (corrupt or truncated): {0}")]
    Corrupt(String),
}

/// Limits applied before any pixel is decoded.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_pixels: u64,
}

/// Decodes JPEG, PNG, WebP, BMP or GIF (first frame), checks the pixel count from the header first,
/// and applies the EXIF orientation.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let format = reader.format().ok_or(ImageError::UnsupportedFormat)?;
    // Read the size from the header alone first: the decoders need more than the header (a PNG's first
    // data chunk, say) before they report it, and a bomb must be refused without touching its pixels.
    // Not for BMP: `imagesize` reads a top-down BMP's negative height as a huge one, and the BMP decoder
    // reads only the header before it reports the size anyway.
    if format != ImageFormat::Bmp {
        if let Ok(size) = imagesize::blob_size(bytes) {
            check_pixels(size.width as u64, size.height as u64, limits)?;
        }
    }
    let mut decoder = reader.into_decoder().map_err(classify_decode_error)?;
    let (width, height) = decoder.dimensions();
    check_pixels(u64::from(width), u64::from(height), limits)?;
    if format == ImageFormat::Jpeg && !jpeg_has_end_marker(bytes) {
        return Err(ImageError::Corrupt("the JPEG data ends before its end-of-image marker (truncated)".into()));
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(classify_decode_error)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Width x height from the image's header alone, when its format is known and the header readable.
pub fn header_pixels(bytes: &[u8]) -> Option<u64> {
    header_dimensions(bytes).ok().map(|(width, height)| u64::from(width) * u64::from(height))
}

/// Whether `bytes` start like an image `decode` would take, judged from the header alone (for work that
/// decodes later, so that a request with something else is refused at once).
pub fn check_header(bytes: &[u8], limits: DecodeLimits) -> Result<(), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let (width, height) = header_dimensions(bytes)?;
    check_pixels(u64::from(width), u64::from(height), limits)
}

fn header_dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::UnsupportedFormat);
    }
    reader.into_dimensions().map_err(classify_decode_error)
}

/// A concept mask from a mask image: where alpha is over 0 for images with alpha, else where the grey
/// value is over 127. Returns 0 or 255 per pixel.
pub fn binary_mask(image: &DynamicImage) -> GrayImage {
    if image.color().has_alpha() {
        let rgba = image.to_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            Luma([if rgba.get_pixel(x, y).0[3] > 0 { 255 } else { 0 }])
        })
    } else {
        let grey = image.to_luma8();
        GrayImage::from_fn(grey.width(), grey.height(), |x, y| {
            Luma([if grey.get_pixel(x, y).0[0] > 127 { 255 } else { 0 }])
        })
    }
}

fn check_pixels(width: u64, height: u64, limits: DecodeLimits) -> Result<(), ImageError> {
    let pixels = width.saturating_mul(height);
    if pixels > limits.max_pixels {
        return Err(ImageError::TooManyPixels { width, height, pixels, limit: limits.max_pixels });
    }
    Ok(())
}

/// The JPEG decoder fills a truncated scan with grey instead of failing, so check for completeness here:
/// walk the marker segments to the first start-of-scan (skipping embedded thumbnails in APP segments),
/// then look for the end-of-image marker, which entropy-coded data cannot contain.
fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    const SOS: u8 = 0xDA;
    const EOI: u8 = 0xD9;
    let mut pos = 2;
    while pos + 4 <= bytes.len() {
        if bytes[pos] != 0xFF {
            return false;
        }
        let marker = bytes[pos + 1];
        if marker == 0xFF {
            pos += 1;
            continue;
        }
        let length = usize::from(u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]));
        if marker == SOS {
            return bytes[pos + 2 + length.min(bytes.len() - pos - 2)..].windows(2).any(|w| w == [0xFF, EOI]);
        }
        pos += 2 + length;
    }
    false
}

fn classify_decode_error(error: image::ImageError) -> ImageError {
    match error {
        image::ImageError::Unsupported(_) => ImageError::UnsupportedFormat,
        other => ImageError::Corrupt(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 40_000_000 };

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        DynamicImage::new_rgb8(width, height).write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn rejects_empty_and_unknown_bytes() {
        assert!(matches!(decode(&[], LIMITS), Err(ImageError::Empty)));
        assert!(matches!(decode(b"hello world, not an image", LIMITS), Err(ImageError::UnsupportedFormat)));
    }

    #[test]
    fn checks_pixels_before_decoding() {
        let mut bytes = png(4, 4);
        // Rewrite the IHDR's width and height to 100000 x 100000 (with its CRC); the pixel data stays tiny.
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        // Only the signature and header: the decoder alone would fail before it reports the size.
        bytes.truncate(33);
        assert!(matches!(
            decode(&bytes, LIMITS),
            Err(ImageError::TooManyPixels { width: 100_000, height: 100_000, pixels: 10_000_000_000, .. })
        ));
    }

    #[test]
    fn decodes_every_supported_format() {
        let image = DynamicImage::ImageRgb8(image::RgbImage::from_fn(20, 12, |x, y| {
            image::Rgb([x as u8 * 9, y as u8 * 20, 99])
        }));
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Bmp, ImageFormat::Gif] {
            let mut bytes = Vec::new();
            image.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
            let decoded = decode(&bytes, LIMITS).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!((decoded.width(), decoded.height()), (20, 12), "{format:?}");
        }
    }

    /// A JPEG with an EXIF APP1 segment whose orientation tag is `orientation`.
    fn jpeg_with_orientation(width: u32, height: u32, orientation: u16) -> Vec<u8> {
        let mut jpeg = Vec::new();
        DynamicImage::new_rgb8(width, height).write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg).unwrap();
        // TIFF header (little endian), one IFD entry: tag 0x0112, type SHORT, count 1, value; no next IFD.
        let mut tiff = b"II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let payload = [b"Exif\0\0".as_slice(), &tiff].concat();
        let mut segment = vec![0xFF, 0xE1];
        segment.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        segment.extend_from_slice(&payload);
        [&jpeg[..2], &segment, &jpeg[2..]].concat()
    }

    #[test]
    fn applies_exif_orientation() {
        let upright = decode(&jpeg_with_orientation(40, 10, 1), LIMITS).unwrap();
        assert_eq!((upright.width(), upright.height()), (40, 10));
        let rotated = decode(&jpeg_with_orientation(40, 10, 6), LIMITS).unwrap();
        assert_eq!((rotated.width(), rotated.height()), (10, 40));
    }

    #[test]
    fn masks_from_grey_or_alpha() {
        let grey = DynamicImage::ImageLuma8(GrayImage::from_fn(4, 1, |x, _| Luma([[0, 127, 128, 255][x as usize]])));
        assert_eq!(binary_mask(&grey).into_raw(), vec![0, 0, 255, 255]);
        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_fn(3, 1, |x, _| {
            image::Rgba([255, 255, 255, [0, 1, 255][x as usize]])
        }));
        assert_eq!(binary_mask(&rgba).into_raw(), vec![0, 255, 255]);
    }

    #[test]
    fn truncated_jpeg_is_corrupt() {
        let mut jpeg = Vec::new();
        let image =
            DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 7])));
        image.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg).unwrap();
        assert!(decode(&jpeg, LIMITS).is_ok());
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"camera trailer");
        assert!(decode(&trailing, LIMITS).is_ok());
        for cut in [jpeg.len() - 2, jpeg.len() / 2, 200] {
            assert!(matches!(decode(&jpeg[..cut], LIMITS), Err(ImageError::Corrupt(_))), "cut at {cut}");
        }
    }

    #[test]
    fn truncated_image_is_corrupt() {
        let bytes = png(64, 64);
        assert!(matches!(decode(&bytes[..bytes.len() / 2], LIMITS), Err(ImageError::Corrupt(_))));
    }
}
