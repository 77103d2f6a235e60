//! The one caller extractor: every route, `/metrics` and `/v1/live` included,
//! learns who is calling from the `Authorization: Bearer …` header here.
//! Must not: accept a token from anywhere else (the WebSocket auth message is
//! the live protocol's, and resolves through the same key ring).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use crate::auth::Caller;
use crate::node::Node;

/// The bearer token of a request, if it presents one. A header that is not a
/// bearer token presents an unusable one (the caller is `Invalid`, not
/// `Anonymous`).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?;
    let Some(text) = value.to_str().ok() else {
        return Some("");
    };
    // the scheme is case-insensitive (RFC 9110 §11.1)
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Some(token.trim()),
        _ => Some(""),
    }
}

impl FromRequestParts<Arc<Node>> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Caller, Infallible> {
        Ok(match bearer_token(&parts.headers) {
            // an empty token is never a key
            Some("") => Caller::Invalid,
            token => node.keys.caller(token),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_header_alone() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, "bEaReR  key-a ".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("key-a"));
        headers.insert(header::AUTHORIZATION, "Basic a2V5".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some(""));
    }
}
