//! The preprocessing a model package declares: resize the shorter side, centre-crop, scale and normalise,
//! following torchvision's `Resize` + `CenterCrop` + `Normalize` (PIL filters, antialiased).

use image::{DynamicImage, GrayImage, RgbImage};

use super::resample::resize_crop_rgb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// `value = (pixel / pixel_scale - mean[c]) / std[c]` after resizing the shorter side to `resize_shorter`
/// and centre-cropping to `crop` (height, width). ImageNet-style models use pixel_scale 255 and the usual
/// mean/std; TensorFlow-style ones pixel_scale 1, mean 127, std 128; Caffe-style BGR with std 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    pub resize_shorter: u32,
    pub crop: [u32; 2],
    pub interpolation: Interpolation,
    pub channel_order: ChannelOrder,
    pub pixel_scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// A preprocessed image in CHW float layout, ready to be stacked into a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub data: Vec<f32>,
    pub height: u32,
    pub width: u32,
}

impl Preprocessing {
    pub fn validate(&self) -> Result<(), String> {
        let [crop_h, crop_w] = self.crop;
        if crop_h == 0 || crop_w == 0 || self.resize_shorter < crop_h.max(crop_w) {
            return Err(format!(
                "crop {:?} must be non-empty and fit in resize_shorter {}",
                self.crop, self.resize_shorter
            ));
        }
        // Written so that NaN fails too.
        let positive = |x: f32| x > 0.0;
        if !positive(self.pixel_scale) || !self.std.iter().copied().all(positive) {
            return Err("pixel_scale and std must be positive".into());
        }
        Ok(())
    }

    pub fn apply(&self, image: &DynamicImage) -> InputTensor {
        let (pixels, crop_h, crop_w) = self.resize_and_crop(&image.to_rgb8());
        let plane = crop_h * crop_w;
        let mut data = vec![0f32; 3 * plane];
        let channels: [usize; 3] = match self.channel_order {
            ChannelOrder::Rgb => [0, 1, 2],
            ChannelOrder::Bgr => [2, 1, 0],
        };
        for (offset, pixel) in pixels.chunks_exact(3).enumerate() {
            for (out_c, &src_c) in channels.iter().enumerate() {
                let value = f32::from(pixel[src_c]) / self.pixel_scale;
                data[out_c * plane + offset] = (value - self.mean[out_c]) / self.std[out_c];
            }
        }
        InputTensor { data, height: crop_h as u32, width: crop_w as u32 }
    }

    /// A concept mask (0 or 255 per pixel) through the same resize and crop as its image, as values in
    /// [0, 1] (1 x H x W), so that it stays aligned with the network input.
    pub fn apply_to_mask(&self, mask: &GrayImage) -> InputTensor {
        let rgb = DynamicImage::ImageLuma8(mask.clone()).to_rgb8();
        let (pixels, crop_h, crop_w) = self.resize_and_crop(&rgb);
        let data = pixels.chunks_exact(3).map(|p| f32::from(p[0]) / 255.0).collect();
        InputTensor { data, height: crop_h as u32, width: crop_w as u32 }
    }

    fn resize_and_crop(&self, rgb: &RgbImage) -> (Vec<u8>, usize, usize) {
        let (width, height) = rgb.dimensions();
        let (new_w, new_h) = shorter_side_size(width, height, self.resize_shorter);
        let [crop_h, crop_w] = self.crop;
        // torchvision's CenterCrop offsets; `validate` guarantees the crop fits in the resized image.
        let top = ((f64::from(new_h) - f64::from(crop_h)) / 2.0).round() as usize;
        let left = ((f64::from(new_w) - f64::from(crop_w)) / 2.0).round() as usize;
        let (crop_h, crop_w) = (crop_h as usize, crop_w as usize);
        let pixels = resize_crop_rgb(
            rgb.as_raw(),
            (width as usize, height as usize),
            (new_w as usize, new_h as usize),
            (left, top, crop_w, crop_h),
            self.interpolation,
        );
        (pixels, crop_h, crop_w)
    }
}

/// torchvision's `Resize(int)`: the shorter side becomes `target`, the longer one is truncated.
fn shorter_side_size(width: u32, height: u32, target: u32) -> (u32, u32) {
    if width <= height {
        let long = (u64::from(target) * u64::from(height) / u64::from(width.max(1))) as u32;
        (target, long.max(1))
    } else {
        let long = (u64::from(target) * u64::from(width) / u64::from(height.max(1))) as u32;
        (long.max(1), target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imagenet() -> Preprocessing {
        Preprocessing {
            resize_shorter: 256,
            crop: [224, 224],
            interpolation: Interpolation::Bilinear,
            channel_order: ChannelOrder::Rgb,
            pixel_scale: 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    #[test]
    fn resizes_shorter_side_like_torchvision() {
        assert_eq!(shorter_side_size(640, 480, 256), (341, 256));
        assert_eq!(shorter_side_size(480, 640, 256), (256, 341));
        assert_eq!(shorter_side_size(224, 224, 256), (256, 256));
    }

    #[test]
    fn normalises_per_channel_in_chw_order() {
        let image = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(300, 400, image::Rgb([255, 0, 128])));
        let out = imagenet().apply(&image);
        assert_eq!((out.height, out.width, out.data.len()), (224, 224, 3 * 224 * 224));
        let plane = 224 * 224;
        assert!((out.data[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!((out.data[plane] - (0.0 - 0.456) / 0.224).abs() < 1e-5);
        assert!((out.data[2 * plane + 500] - (128.0 / 255.0 - 0.406) / 0.225).abs() < 1e-5);
    }

    #[test]
    fn bgr_order_swaps_channels() {
        let mut p = imagenet();
        p.channel_order = ChannelOrder::Bgr;
        p.pixel_scale = 1.0;
        p.mean = [0.0; 3];
        p.std = [1.0; 3];
        let image = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(256, 256, image::Rgb([10, 20, 30])));
        let out = p.apply(&image);
        assert_eq!(out.data[0], 30.0);
        assert_eq!(out.data[224 * 224 * 2], 10.0);
    }

    #[test]
    fn grey_and_alpha_images_become_rgb() {
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(256, 256, image::Luma([200])));
        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(256, 256, image::Rgba([200, 200, 200, 7])));
        assert_eq!(imagenet().apply(&grey), imagenet().apply(&rgba));
    }
}
