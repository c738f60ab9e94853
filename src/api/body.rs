//! Reading request bodies within the size limit: raw bytes, and multipart parts by name.

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequest, Multipart, Request};
use bytes::Bytes;
use http_body_util::LengthLimitError;
use utoipa::{IntoResponses, ToSchema};

use super::error::{ApiError, ErrorBody};

/// An encoded image (JPEG, PNG, WebP, BMP or GIF), as a request body or a multipart part.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct EncodedImage(pub Bytes);

/// The refusals of every route that stores uploaded images, stated once for the OpenAPI document.
#[derive(IntoResponses)]
#[expect(dead_code, reason = "only documents the answers; ApiError makes the real ones")]
pub enum UploadRefusals {
    #[response(status = 413, description = "`payload_too_large`")]
    TooLarge(ErrorBody),
    #[response(status = 415, description = "`unsupported_image_format`")]
    Unsupported(ErrorBody),
    #[response(
        status = 422,
        description = "`invalid_request`, `invalid_argument`, `empty_image`, `invalid_image`, `image_too_large`"
    )]
    Invalid(ErrorBody),
}

/// The parts of a multipart body, in order, each read whole.
pub struct Parts(Vec<(String, Bytes)>);

impl Parts {
    /// Reads every part, also after one that will be refused, so that the error reaches a client that
    /// is still sending.
    /// At most `most_parts` are kept; the rest are read and dropped, and the request is refused.
    pub async fn read(request: Request, limit: usize, most_parts: usize) -> Result<Self, ApiError> {
        let mut multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("invalid multipart body: {}", e.body_text())))?;
        let (mut parts, mut extra) = (Vec::new(), 0usize);
        while let Some(field) = multipart.next_field().await.map_err(|e| multipart_error(e, limit))? {
            let name = field.name().unwrap_or_default().to_string();
            let bytes = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
            if parts.len() < most_parts {
                parts.push((name, bytes));
            } else {
                extra += 1;
            }
        }
        if extra > 0 {
            return Err(ApiError::TooMany(format!(
                "{} multipart parts where this route takes at most {most_parts}",
                most_parts + extra
            )));
        }
        Ok(Self(parts))
    }

    pub fn take_all(&mut self, name: &str) -> Vec<Bytes> {
        let (taken, rest) = std::mem::take(&mut self.0).into_iter().partition(|(n, _)| n == name);
        self.0 = rest;
        taken.into_iter().map(|(_, bytes)| bytes).collect()
    }

    pub fn take_images(&mut self, name: &str) -> Vec<EncodedImage> {
        self.take_all(name).into_iter().map(EncodedImage).collect()
    }

    /// The part named `name`, if there is exactly one; two are an error.
    pub fn take_one(&mut self, name: &str) -> Result<Option<Bytes>, ApiError> {
        let mut all = self.take_all(name);
        match all.len() {
            0 | 1 => Ok(all.pop()),
            n => Err(ApiError::InvalidRequest(format!("expected one part named '{name}', got {n}"))),
        }
    }

    /// The text part named `name`, trimmed, if there is exactly one.
    pub fn take_text(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        self.take_one(name)?
            .map(|bytes| String::from_utf8(bytes.to_vec()).map(|s| s.trim().to_string()))
            .transpose()
            .map_err(|_| ApiError::InvalidRequest(format!("part '{name}' must be UTF-8 text")))
    }

    pub fn expect_no_more(&self, accepted: &str) -> Result<(), ApiError> {
        match self.0.first() {
            Some((name, _)) => Err(ApiError::InvalidRequest(format!("unexpected multipart part '{name}': {accepted}"))),
            None => Ok(()),
        }
    }
}

fn multipart_error(error: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if error.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::InvalidRequest(format!("invalid multipart body: {}", error.body_text()))
    }
}

pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if err.is::<LengthLimitError>() {
                return ApiError::PayloadTooLarge { limit };
            }
            source = err.source();
        }
        ApiError::InvalidRequest(format!("cannot read the request body: {e}"))
    })
}
