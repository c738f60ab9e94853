//! Concepts on an exemplar: masks drawn from polygons and boxes, and the transforms that make a modified
//! copy by changing the image inside the mask (a tiled texture, a flat colour, a blur).

use image::{GrayImage, Luma, Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_polygon_mut};
use imageproc::point::Point;
use imageproc::rect::Rect;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"polygons": [[[x, y], ...], ...], "boxes": [[x0, y0, x1, y1], ...]}` in image pixels; at most 10,000
/// points together (`MOST_SHAPE_POINTS`; a box counts 2).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaskShapes {
    #[serde(default)]
    pub polygons: Vec<Vec<[f32; 2]>>,
    #[serde(default)]
    pub boxes: Vec<[f32; 4]>,
}

/// Points of all the polygons and boxes of one mask.
pub const MOST_SHAPE_POINTS: usize = 10_000;

impl MaskShapes {
    /// The mask (0 or 255) of a `width` x `height` image.
    pub fn rasterize(&self, width: u32, height: u32) -> Result<GrayImage, String> {
        // Drawing costs grow with the points: a request must not buy unbounded work with a few bytes each.
        let points = self.polygons.iter().map(Vec::len).sum::<usize>() + 2 * self.boxes.len();
        if points > MOST_SHAPE_POINTS {
            return Err(format!("the shapes have {points} points; at most {MOST_SHAPE_POINTS} (a box counts 2)"));
        }
        let mut mask = GrayImage::new(width, height);
        for polygon in &self.polygons {
            if polygon.len() < 3 {
                return Err(format!("a polygon needs at least 3 points, got {}", polygon.len()));
            }
            let mut points: Vec<Point<i32>> =
                polygon.iter().map(|[x, y]| Point::new(x.round() as i32, y.round() as i32)).collect();
            // imageproc rejects a closing point equal to the first one.
            if points.len() > 3 && points.first() == points.last() {
                points.pop();
            }
            draw_polygon_mut(&mut mask, &points, Luma([255]));
        }
        for &[x0, y0, x1, y1] in &self.boxes {
            if !(x1 > x0 && y1 > y0) {
                return Err(format!("a box needs x0 < x1 and y0 < y1, got [{x0}, {y0}, {x1}, {y1}]"));
            }
            let (left, top) = (x0.round() as i32, y0.round() as i32);
            let (w, h) = ((x1.round() as i32 - left).max(1) as u32, (y1.round() as i32 - top).max(1) as u32);
            draw_filled_rect_mut(&mut mask, Rect::at(left, top).of_size(w, h), Luma([255]));
        }
        Ok(mask)
    }
}

/// How the server makes the modified image from the original, inside the mask.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// Tile an uploaded texture over the concept, blended with `opacity` (0 to 1).
    Texture {
        texture: String,
        #[serde(default = "full_opacity")]
        opacity: f32,
    },
    Fill {
        rgb: [u8; 3],
    },
    /// Gaussian blur of standard deviation `sigma` pixels.
    Blur {
        sigma: f32,
    },
}

fn full_opacity() -> f32 {
    1.0
}

impl Transform {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Transform::Texture { opacity, .. } if !(0.0..=1.0).contains(opacity) => {
                Err(format!("opacity must be between 0 and 1, got {opacity}"))
            }
            Transform::Blur { sigma } if !(*sigma > 0.0 && *sigma <= 100.0) => {
                Err(format!("sigma must be in (0, 100], got {sigma}"))
            }
            _ => Ok(()),
        }
    }

    /// The modified image. `texture` is the uploaded texture a `Texture` transform names.
    pub fn apply(&self, image: &RgbImage, mask: &GrayImage, texture: Option<&RgbImage>) -> RgbImage {
        let source: Box<dyn Fn(u32, u32) -> (Rgb<u8>, f32)> = match (self, texture) {
            (Transform::Texture { opacity, .. }, Some(t)) => {
                Box::new(move |x, y| (*t.get_pixel(x % t.width(), y % t.height()), *opacity))
            }
            (Transform::Fill { rgb }, _) => Box::new(move |_, _| (Rgb(*rgb), 1.0)),
            (Transform::Blur { sigma }, _) => {
                let blurred = imageproc::filter::gaussian_blur_f32(image, *sigma);
                Box::new(move |x, y| (*blurred.get_pixel(x, y), 1.0))
            }
            (Transform::Texture { .. }, None) => Box::new(|_, _| (Rgb([0, 0, 0]), 0.0)),
        };
        let mut out = image.clone();
        for (x, y, pixel) in out.enumerate_pixels_mut() {
            if mask.get_pixel(x, y).0[0] > 0 {
                let (new, alpha) = source(x, y);
                for c in 0..3 {
                    pixel.0[c] = (f32::from(new.0[c]) * alpha + f32::from(pixel.0[c]) * (1.0 - alpha)).round() as u8;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rasterizes_boxes_and_polygons() {
        let shapes: MaskShapes = serde_json::from_str(
            r#"{"boxes": [[0, 0, 4, 2]], "polygons": [[[10, 10], [19, 10], [19, 19], [10, 19]]]}"#,
        )
        .unwrap();
        let mask = shapes.rasterize(20, 20).unwrap();
        assert_eq!(mask.get_pixel(1, 1).0[0], 255);
        assert_eq!(mask.get_pixel(5, 1).0[0], 0);
        assert_eq!(mask.get_pixel(15, 15).0[0], 255);
        assert_eq!(mask.get_pixel(5, 15).0[0], 0);
        assert!(MaskShapes { polygons: vec![vec![[0.0, 0.0], [1.0, 1.0]]], boxes: vec![] }.rasterize(4, 4).is_err());
        assert!(MaskShapes { polygons: vec![], boxes: vec![[3.0, 0.0, 1.0, 2.0]] }.rasterize(4, 4).is_err());
        let square = vec![[0.0, 0.0], [3.0, 0.0], [3.0, 3.0], [0.0, 3.0]];
        let many = MaskShapes { polygons: vec![square; MOST_SHAPE_POINTS / 4], boxes: vec![] };
        assert!(many.rasterize(4, 4).is_ok(), "exactly the limit");
        let too_many = MaskShapes { boxes: vec![[0.0, 0.0, 1.0, 1.0]], ..many };
        assert!(too_many.rasterize(4, 4).unwrap_err().contains("at most 10000"));
    }

    #[test]
    fn transforms_change_only_the_masked_pixels() {
        let image = RgbImage::from_pixel(8, 8, Rgb([10, 20, 30]));
        let mask = GrayImage::from_fn(8, 8, |x, _| Luma([if x < 4 { 255 } else { 0 }]));
        let filled = Transform::Fill { rgb: [200, 0, 0] }.apply(&image, &mask, None);
        assert_eq!(filled.get_pixel(0, 0).0, [200, 0, 0]);
        assert_eq!(filled.get_pixel(7, 0).0, [10, 20, 30]);
        let texture = RgbImage::from_fn(2, 2, |x, _| Rgb(if x == 0 { [255, 255, 255] } else { [0, 0, 0] }));
        let half = Transform::Texture { texture: "t".into(), opacity: 0.5 }.apply(&image, &mask, Some(&texture));
        assert_eq!(half.get_pixel(0, 0).0, [133, 138, 143]);
        assert_eq!(half.get_pixel(1, 0).0, [5, 10, 15]);
        let transform: Transform = serde_json::from_str(r#"{"kind": "blur", "sigma": 8}"#).unwrap();
        assert_eq!(transform, Transform::Blur { sigma: 8.0 });
        assert!(Transform::Blur { sigma: 0.0 }.validate().is_err());
        assert!(serde_json::from_str::<Transform>(r#"{"kind": "paint"}"#).is_err());
    }
}
