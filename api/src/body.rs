//! Request bodies: at most `MAX_BODY` bytes of JSON whose every field is known, complete
//! within the body timeout.

use crate::{ApiError, MAX_BODY};
use axum::body::Body;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Reads the body (at most `MAX_BODY` bytes, within `timeout`) and parses it.
pub(crate) async fn json<T: DeserializeOwned>(
    body: Body,
    timeout: Duration,
) -> Result<T, ApiError> {
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY));
    let bytes = read
        .await
        .map_err(|_| ApiError::Timeout(timeout))?
        .map_err(|e| {
            let inner = e.into_inner();
            if inner.is::<http_body_util::LengthLimitError>() {
                ApiError::TooLarge(MAX_BODY)
            } else {
                ApiError::BadRequest(format!("cannot read the body: {inner}"))
            }
        })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "the body is empty; this request takes a JSON object".into(),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
}
