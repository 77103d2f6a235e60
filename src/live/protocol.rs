//! The WebSocket protocol of `/v1/live` as types (API.md §5): what a client
//! sends and what the server sends back.
//! Owns: parsing a client message into a `ClientMessage` (or the error to
//! answer), and the shape of every server message.
//! Must not: act on a message (the session does).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::read::MetricView;

/// What a client sends; `op` names the variant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ClientMessage {
    Auth {
        token: String,
        #[serde(default)]
        tenant: Option<String>,
    },
    Subscribe(Subscribe),
    Unsubscribe {
        id: String,
    },
}

/// A subscription to metrics (`metrics`, `windows`, `interval_ms`) or to a
/// topic of records (`topic`, `since`). Names are checked by the session.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Subscribe {
    pub id: String,
    #[serde(default)]
    pub metrics: Option<Vec<String>>,
    #[serde(default)]
    pub windows: Option<Vec<String>>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub since: Option<u64>,
    /// `signals` only: the one experiment to follow.
    #[serde(default)]
    pub experiment: Option<String>,
}

/// Only the `op` of a message, to tell an unknown op from a bad message.
#[derive(Deserialize)]
struct Op {
    #[serde(default)]
    op: Option<String>,
}

/// Parses a client message; the error is the message to answer with.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ServerMessage> {
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return Err(ServerMessage::error(
            ErrorCode::BadJson,
            "a message must be a json object",
        ));
    }
    let op = serde_json::from_str::<Op>(text).ok().and_then(|op| op.op);
    match op.as_deref() {
        Some("auth" | "subscribe" | "unsubscribe") => serde_json::from_str(text)
            .map_err(|error| ServerMessage::error(ErrorCode::BadMessage, error.to_string())),
        _ => Err(ServerMessage::error(
            ErrorCode::UnknownOp,
            "op must be auth, subscribe or unsubscribe",
        )),
    }
}

/// The codes of error messages; the connection stays open after each (a
/// close follows `too_far_behind` and `too_many_sessions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownOp,
    BadMessage,
    UnknownMetric,
    UnknownWindow,
    BadInterval,
    UnknownTopic,
    DuplicateId,
    TooManySubscriptions,
    UnknownSubscription,
    AlreadyAuthenticated,
    Unavailable,
    TooFarBehind,
    UnreadableRecord,
    TooManySessions,
    TooManyMessages,
}

/// What the server sends; `type` names the variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Snapshot {
        sub: String,
        at: i64,
        metrics: BTreeMap<String, MetricView>,
    },
    Update {
        sub: String,
        at: i64,
        metrics: BTreeMap<String, MetricView>,
    },
    Unsubscribed {
        sub: String,
    },
    /// A stored alert record: its own fields, with `sub` and `seq`.
    Alert {
        sub: String,
        seq: u64,
        #[serde(flatten)]
        record: Map<String, Value>,
    },
    /// A stored experiment signal record.
    Signal {
        sub: String,
        seq: u64,
        #[serde(flatten)]
        record: Map<String, Value>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Sent every `live.heartbeat_interval_ms`: the node and the path to it
    /// are alive, even when nothing changes.
    Heartbeat {
        at: i64,
        interval_ms: u64,
    },
}

impl ServerMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerMessage {
        ServerMessage::Error {
            code,
            message: message.into(),
        }
    }

    pub fn to_text(&self) -> String {
        // every field serializes (strings, numbers, maps with string keys)
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code_of(text: &str) -> Option<ErrorCode> {
        match parse_client_message(text) {
            Err(ServerMessage::Error { code, .. }) => Some(code),
            _ => None,
        }
    }

    #[test]
    fn client_messages_parse_into_types() {
        assert_eq!(
            parse_client_message(r#"{"op":"auth","token":"k"}"#),
            Ok(ClientMessage::Auth {
                token: "k".into(),
                tenant: None
            })
        );
        let Ok(ClientMessage::Subscribe(subscribe)) = parse_client_message(
            r#"{"op":"subscribe","id":"a","metrics":["gmv"],"interval_ms":500}"#,
        ) else {
            panic!("a subscribe");
        };
        assert_eq!(subscribe.metrics, Some(vec!["gmv".to_string()]));
        assert_eq!(subscribe.interval_ms, Some(500));
        assert_eq!(code_of("{not json"), Some(ErrorCode::BadJson));
        assert_eq!(code_of(r#""a string""#), Some(ErrorCode::UnknownOp));
        assert_eq!(code_of(r#"{"op":"dance"}"#), Some(ErrorCode::UnknownOp));
        assert_eq!(
            code_of(r#"{"op":"unsubscribe"}"#),
            Some(ErrorCode::BadMessage)
        );
        assert_eq!(
            code_of(r#"{"op":"subscribe","id":"a","interval_ms":"soon"}"#),
            Some(ErrorCode::BadMessage)
        );
        for since in ["-1", "1.5", "\"3\""] {
            let text = format!(r#"{{"op":"subscribe","id":"a","topic":"alerts","since":{since}}}"#);
            assert_eq!(code_of(&text), Some(ErrorCode::BadMessage), "{text}");
        }
        assert_eq!(
            code_of(r#"{"op":"subscribe","id":7}"#),
            Some(ErrorCode::BadMessage)
        );
    }

    #[test]
    fn server_messages_have_the_api_shape() {
        assert_eq!(
            serde_json::to_value(ServerMessage::error(ErrorCode::TooFarBehind, "x")).unwrap(),
            json!({"type": "error", "code": "too_far_behind", "message": "x"})
        );
        let mut record = Map::new();
        record.insert("rule".into(), json!("pfr"));
        assert_eq!(
            serde_json::to_value(ServerMessage::Alert {
                sub: "a".into(),
                seq: 2,
                record
            })
            .unwrap(),
            json!({"type": "alert", "sub": "a", "seq": 2, "rule": "pfr"})
        );
    }
}
