//! The one query-string parser of every route (`RawQuery` in, JSON errors out) and the parameters several
//! routes share.

use std::collections::HashMap;

use super::error::ApiError;

pub(super) const DEFAULT_TOP_K: usize = 5;
pub(super) const DEFAULT_PAGE: u32 = 50;
pub(super) const LARGEST_PAGE: u32 = 200;

/// Parameters by name.
pub type Query = HashMap<String, String>;

/// The parameters of a query string; a parameter the route does not take is an error (a typo must not
/// silently fall back to a default).
pub fn parse_query(query: Option<&str>, accepted: &[&str]) -> Result<Query, ApiError> {
    let mut pairs = HashMap::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if !accepted.contains(&key.as_ref()) {
            return Err(ApiError::InvalidRequest(format!(
                "unknown query parameter '{key}'; accepted: {}",
                accepted.join(", ")
            )));
        }
        pairs.insert(key.into_owned(), value.into_owned());
    }
    Ok(pairs)
}

/// `top_k`: how many classes a classification answers with.
pub fn top_k(query: &Query) -> Result<usize, ApiError> {
    match query.get("top_k") {
        None => Ok(DEFAULT_TOP_K),
        Some(value) => value
            .parse()
            .map_err(|_| ApiError::InvalidRequest(format!("top_k must be a positive integer, got '{value}'"))),
    }
}

/// A non-negative integer parameter, when given.
pub fn parse_number(query: &Query, key: &str) -> Result<Option<u32>, ApiError> {
    query
        .get(key)
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::InvalidRequest(format!("{key} must be an integer from 0 to {}, got '{v}'", u32::MAX))
            })
        })
        .transpose()
}

/// A list's `limit`: `DEFAULT_PAGE` unless given, at most `LARGEST_PAGE`.
pub fn page_limit(query: &Query) -> Result<u32, ApiError> {
    limit_within(query, DEFAULT_PAGE, LARGEST_PAGE)
}

/// `limit`: `default` unless given, between 1 and `largest`.
pub fn limit_within(query: &Query, default: u32, largest: u32) -> Result<u32, ApiError> {
    let limit = parse_number(query, "limit")?.unwrap_or(default);
    if !(1..=largest).contains(&limit) {
        return Err(ApiError::InvalidRequest(format!("limit must be between 1 and {largest}, got {limit}")));
    }
    Ok(limit)
}
