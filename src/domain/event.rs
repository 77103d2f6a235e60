//! Events as they arrive (API.md §3): a lenient parse that keeps every field
//! readable, then validation that gives each bad event one precise reason.
//! Owns: the field rules, the outcome reasons, the validated event.
//! Must not: decide de-duplication or lateness (that needs tenant state), read
//! the clock, or know about HTTP. Money stays an `i64` of minor units throughout.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::catalogue::{Catalogue, TypeRoute};

/// |amount| may not exceed 10^15 minor units.
pub const AMOUNT_ABS_MAX: i64 = 1_000_000_000_000_000;
pub const ID_BYTES_MAX: usize = 128;
pub const TYPE_BYTES_MAX: usize = 64;

/// Why an event was not accepted. The text (`as_str`) is part of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reason {
    MalformedJson,
    NotAnObject,
    InvalidEvent,
    MissingId,
    InvalidId,
    MissingType,
    InvalidType,
    InvalidTs,
    FutureTimestamp,
    MissingAmount,
    AmountNotInteger,
    AmountOutOfRange,
    MissingCurrency,
    InvalidCurrency,
    CurrencyMismatch,
    MissingValue,
    InvalidValue,
    ValueNotInteger,
    ValueOutOfRange,
    InvalidDims,
    InvalidExperiments,
    InvalidTenant,
    TenantMismatch,
    MissingTenant,
    UnknownTenant,
    /// A quarantining enrichment's table lacks the event's key (added last:
    /// stored entries keep their reasons' numbers).
    EnrichmentMiss,
}

impl Reason {
    pub const ALL: [Reason; 26] = [
        Reason::MalformedJson,
        Reason::NotAnObject,
        Reason::InvalidEvent,
        Reason::MissingId,
        Reason::InvalidId,
        Reason::MissingType,
        Reason::InvalidType,
        Reason::InvalidTs,
        Reason::FutureTimestamp,
        Reason::MissingAmount,
        Reason::AmountNotInteger,
        Reason::AmountOutOfRange,
        Reason::MissingCurrency,
        Reason::InvalidCurrency,
        Reason::CurrencyMismatch,
        Reason::MissingValue,
        Reason::InvalidValue,
        Reason::ValueNotInteger,
        Reason::ValueOutOfRange,
        Reason::InvalidDims,
        Reason::InvalidExperiments,
        Reason::InvalidTenant,
        Reason::TenantMismatch,
        Reason::MissingTenant,
        Reason::UnknownTenant,
        Reason::EnrichmentMiss,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::NotAnObject => "not_an_object",
            Reason::InvalidEvent => "invalid_event",
            Reason::MissingId => "missing_id",
            Reason::InvalidId => "invalid_id",
            Reason::MissingType => "missing_type",
            Reason::InvalidType => "invalid_type",
            Reason::InvalidTs => "invalid_ts",
            Reason::FutureTimestamp => "future_timestamp",
            Reason::MissingAmount => "missing_amount",
            Reason::AmountNotInteger => "amount_not_integer",
            Reason::AmountOutOfRange => "amount_out_of_range",
            Reason::MissingCurrency => "missing_currency",
            Reason::InvalidCurrency => "invalid_currency",
            Reason::CurrencyMismatch => "currency_mismatch",
            Reason::MissingValue => "missing_value",
            Reason::InvalidValue => "invalid_value",
            Reason::ValueNotInteger => "value_not_integer",
            Reason::ValueOutOfRange => "value_out_of_range",
            Reason::InvalidDims => "invalid_dims",
            Reason::InvalidExperiments => "invalid_experiments",
            Reason::InvalidTenant => "invalid_tenant",
            Reason::TenantMismatch => "tenant_mismatch",
            Reason::MissingTenant => "missing_tenant",
            Reason::UnknownTenant => "unknown_tenant",
            Reason::EnrichmentMiss => "enrichment_miss",
        }
    }

    /// What the producer (or the analyst) should do about an event held for
    /// this reason; the quarantine listing shows it beside each event.
    pub fn remedy(self) -> &'static str {
        match self {
            Reason::MalformedJson => "the producer sends invalid JSON: fix its serializer, then resend the event (a retry cannot repair it)",
            Reason::NotAnObject => "each event must be a JSON object: fix the producer, then resend",
            Reason::InvalidEvent => "a field has the wrong type: compare the event with API.md §3 and resend it fixed",
            Reason::MissingId => "give every event an id (the producer's idempotency key) and resend",
            Reason::InvalidId => "ids are 1 to 128 bytes without control characters: fix the id and resend",
            Reason::MissingType => "give the event a type from the catalogue and resend",
            Reason::InvalidType => "the type must be 1 to 64 of [a-z0-9._-]: fix it and resend",
            Reason::InvalidTs => "ts is milliseconds since the epoch (an integer) or RFC 3339: fix it and resend",
            Reason::FutureTimestamp => "the producer's clock runs ahead of ingest.max_clock_skew_ms: fix its clock; retry once its time has come",
            Reason::MissingAmount => "this type feeds a money metric: send amount in integer minor units",
            Reason::AmountNotInteger => "amount is integer minor units (cents), not a decimal: multiply by the currency's minor unit and resend",
            Reason::AmountOutOfRange => "the amount is beyond the node's range: check the producer's units",
            Reason::MissingCurrency => "an amount needs its ISO 4217 currency: add it and resend",
            Reason::InvalidCurrency => "currency must be an ISO 4217 code such as USD: fix it and resend",
            Reason::CurrencyMismatch => "the tenant counts one currency (GET /v1/tenant): convert the amount, or send it to the tenant of that currency",
            Reason::MissingValue => "this type feeds a histogram or integer metric: send value",
            Reason::InvalidValue => "value must be a finite number within the histogram's range: fix it and resend",
            Reason::ValueNotInteger => "this metric sums value as an integer: send a whole number",
            Reason::ValueOutOfRange => "the value is beyond the node's range: check the producer's units",
            Reason::InvalidDims => "dims are string values of declared size, without control characters: fix them and resend",
            Reason::InvalidExperiments => "experiments map experiment ids to variant names (strings): fix and resend",
            Reason::InvalidTenant => "tenant must be a tenant id string: fix it and resend",
            Reason::TenantMismatch => "a tenant key writes its own tenant only: send with that tenant's key",
            Reason::MissingTenant => "an admin key must name the tenant of each event (tenant, or ?tenant=)",
            Reason::UnknownTenant => "no such tenant: fix the tenant id, or ask an admin to add the tenant",
            Reason::EnrichmentMiss => "the lookup table lacks the event's key (see `missing`): add the row with PUT or PATCH /v1/lookups/{table}, then POST /v1/quarantine/retry?reason=enrichment_miss",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Any JSON value, keeping strings borrowed from the body where it can.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Str(Cow<'a, str>),
    Int(i128),
    Float(f64),
    Bool(bool),
    Null,
    Compound,
}

struct ScalarVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
    type Value = Scalar<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any json value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v as i128))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v as i128))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Compound)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Compound)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor(PhantomData))
    }
}

/// The minor digits of an ISO 4217 currency (JPY 0, USD 2, BHD 3): how many
/// of an amount's integer minor units make the decimals. `None` for a code
/// ISO 4217 does not have, or one without a minor unit (XAU).
pub fn currency_minor_digits(code: &str) -> Option<u16> {
    iso_currency::Currency::from_code(code)?.exponent()
}

/// A JSON value that should be an object of string values (`dims`, `experiments`).
#[derive(Debug, Clone, PartialEq)]
pub enum StrMap<'a> {
    Entries(Vec<(Scalar<'a>, Scalar<'a>)>),
    NotAnObject,
}

struct StrMapVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for StrMapVisitor<'a> {
    type Value = StrMap<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<Scalar<'a>, Scalar<'a>>()? {
            entries.push(entry);
        }
        Ok(StrMap::Entries(entries))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(StrMap::NotAnObject)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(StrMap::NotAnObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(StrMap::NotAnObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(StrMap::NotAnObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(StrMap::NotAnObject)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(StrMap::NotAnObject)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(StrMap::NotAnObject)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for StrMap<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrMapVisitor(PhantomData))
    }
}

/// An event as read from the body, before any rule is applied. Unknown fields
/// are ignored; `null` counts as absent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RawEvent<'a> {
    #[serde(borrow, default)]
    pub id: Option<Scalar<'a>>,
    #[serde(borrow, default, rename = "type")]
    pub event_type: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    pub ts: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    pub tenant: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    pub amount: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    pub currency: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    pub value: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    pub dims: Option<StrMap<'a>>,
    #[serde(borrow, default)]
    pub experiments: Option<StrMap<'a>>,
}

/// The `tenant` field of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantField<'e> {
    Absent,
    Named(&'e str),
    Invalid,
}

impl<'a> RawEvent<'a> {
    /// The dims that are strings with string values, as they were sent.
    pub fn dims_text(&self) -> Vec<(String, String)> {
        match &self.dims {
            Some(StrMap::Entries(entries)) => entries
                .iter()
                .filter_map(|(key, value)| match (key, value) {
                    (Scalar::Str(key), Scalar::Str(value)) => {
                        Some((key.to_string(), value.to_string()))
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn tenant(&self) -> TenantField<'_> {
        match &self.tenant {
            None => TenantField::Absent,
            Some(Scalar::Str(name)) => TenantField::Named(name),
            Some(_) => TenantField::Invalid,
        }
    }

    /// The id, when it is a string, for error reports.
    pub fn id_text(&self) -> Option<&str> {
        match &self.id {
            Some(Scalar::Str(id)) => Some(id),
            _ => None,
        }
    }
}

/// Parses one event. The reason tells a line that is not JSON from JSON that is
/// not an event object.
pub fn parse_event(json: &[u8]) -> Result<RawEvent<'_>, Reason> {
    let is_object = json.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{');
    if !is_object {
        // serde would read an array as a struct by position; only objects are events
        return match serde_json::from_slice::<IgnoredAny>(json) {
            Ok(_) => Err(Reason::NotAnObject),
            Err(_) => Err(Reason::MalformedJson),
        };
    }
    match serde_json::from_slice::<RawEvent>(json) {
        Ok(event) => Ok(event),
        Err(error) if error.is_data() => Err(Reason::InvalidEvent),
        Err(_) => Err(Reason::MalformedJson),
    }
}

/// Limits on event fields, from config (`[ingest]`).
#[derive(Debug, Clone, PartialEq)]
pub struct EventLimits {
    pub max_clock_skew_ms: i64,
    pub dims_per_event_max: usize,
    pub dim_key_bytes_max: usize,
    pub dim_value_bytes_max: usize,
    pub histogram_value_max: u64,
}

/// What validation needs to know of the tenant.
#[derive(Debug, Clone, Copy)]
pub struct ValidationContext<'c> {
    pub currency: &'c str,
    pub catalogue: &'c Catalogue,
    pub limits: &'c EventLimits,
}

/// An event that passed every rule. `ts_ms` is set (receipt time when absent).
/// The log stores it without `route`, which is derived from the catalogue again
/// when it is read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidEvent {
    pub id: String,
    pub event_type: String,
    pub ts_ms: i64,
    pub amount: Option<i64>,
    pub value: Option<f64>,
    /// `value` when it was a JSON integer within the amount range.
    pub value_integer: Option<i64>,
    pub dims: Vec<(String, String)>,
    pub experiments: Vec<(String, String)>,
    #[serde(skip)]
    pub route: TypeRoute,
}

impl ValidEvent {
    pub fn dim(&self, key: &str) -> Option<&str> {
        self.dims
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    /// The value a histogram records: `value` rounded to the nearest integer.
    /// Validation guarantees it is within `[0, histogram_value_max]`.
    pub fn histogram_value(&self) -> u64 {
        self.value.map(|value| value.round() as u64).unwrap_or(0)
    }
}

fn is_type_char(byte: u8) -> bool {
    byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'_' | b'.' | b'-')
}

/// True for a valid event type: `[a-z0-9_.-]{1,64}`.
pub fn is_valid_type(text: &str) -> bool {
    !text.is_empty() && text.len() <= TYPE_BYTES_MAX && text.bytes().all(is_type_char)
}

fn string_pairs(
    map: &Option<StrMap<'_>>,
    limits: &EventLimits,
    reason: Reason,
) -> Result<Vec<(String, String)>, Reason> {
    let entries = match map {
        None => return Ok(Vec::new()),
        Some(StrMap::NotAnObject) => return Err(reason),
        Some(StrMap::Entries(entries)) => entries,
    };
    if entries.len() > limits.dims_per_event_max {
        return Err(reason);
    }
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let (Scalar::Str(key), Scalar::Str(value)) = (key, value) else {
            return Err(reason);
        };
        // `__`-values name the breakdowns Tally makes itself (`__none__`, `__other__`)
        if key.is_empty()
            || key.len() > limits.dim_key_bytes_max
            || value.len() > limits.dim_value_bytes_max
            || value.starts_with("__")
            || key.chars().any(char::is_control)
            || value.chars().any(char::is_control)
            || pairs.iter().any(|(seen, _)| seen.as_str() == key.as_ref())
        {
            return Err(reason);
        }
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// Applies every field rule of API.md §3. An event without `ts` happened at
/// `received_ms` (when it first reached the node, also for a retry from the
/// quarantine); the skew is judged against `now_ms`.
pub fn validate_event(
    raw: &RawEvent<'_>,
    context: &ValidationContext<'_>,
    received_ms: i64,
    now_ms: i64,
) -> Result<ValidEvent, Reason> {
    let id = match &raw.id {
        None => return Err(Reason::MissingId),
        // control characters (NUL, newlines, escapes) break logs, CSV and
        // terminals downstream: such an id is quarantined, not counted
        Some(Scalar::Str(id))
            if !id.is_empty() && id.len() <= ID_BYTES_MAX && !id.chars().any(char::is_control) =>
        {
            id
        }
        Some(_) => return Err(Reason::InvalidId),
    };
    let event_type = match &raw.event_type {
        None => return Err(Reason::MissingType),
        Some(Scalar::Str(text)) if is_valid_type(text) => text,
        Some(_) => return Err(Reason::InvalidType),
    };
    if raw.tenant() == TenantField::Invalid {
        return Err(Reason::InvalidTenant);
    }
    let ts_ms = match &raw.ts {
        None => received_ms,
        Some(Scalar::Int(ms)) => i64::try_from(*ms).map_err(|_| Reason::InvalidTs)?,
        Some(Scalar::Str(text)) => chrono::DateTime::parse_from_rfc3339(text)
            .map_err(|_| Reason::InvalidTs)?
            .timestamp_millis(),
        Some(_) => return Err(Reason::InvalidTs),
    };
    if ts_ms > now_ms.saturating_add(context.limits.max_clock_skew_ms) {
        return Err(Reason::FutureTimestamp);
    }
    let amount = match &raw.amount {
        None => None,
        Some(Scalar::Int(amount)) if amount.abs() <= AMOUNT_ABS_MAX as i128 => Some(*amount as i64),
        Some(Scalar::Int(_)) => return Err(Reason::AmountOutOfRange),
        // A float amount is always refused; its size only picks the reason.
        Some(Scalar::Float(amount)) if amount.abs() > AMOUNT_ABS_MAX as f64 => {
            return Err(Reason::AmountOutOfRange)
        }
        Some(_) => return Err(Reason::AmountNotInteger),
    };
    let is_currency_code = |code: &str| iso_currency::Currency::from_code(code).is_some();
    match (&raw.currency, amount) {
        (None, Some(_)) => return Err(Reason::MissingCurrency),
        (None, None) => {}
        (Some(Scalar::Str(code)), _) if !is_currency_code(code) => {
            return Err(Reason::InvalidCurrency)
        }
        (Some(Scalar::Str(code)), Some(_)) if code.as_ref() != context.currency => {
            return Err(Reason::CurrencyMismatch)
        }
        (Some(Scalar::Str(_)), _) => {}
        (Some(_), _) => return Err(Reason::InvalidCurrency),
    }
    let (value, value_integer) = match &raw.value {
        None => (None, None),
        Some(Scalar::Int(value)) if value.abs() <= AMOUNT_ABS_MAX as i128 => {
            (Some(*value as f64), Some(*value as i64))
        }
        Some(Scalar::Int(value)) => (Some(*value as f64), None),
        Some(Scalar::Float(value)) if value.is_finite() => (Some(*value), None),
        Some(_) => return Err(Reason::InvalidValue),
    };
    let dims = string_pairs(&raw.dims, context.limits, Reason::InvalidDims)?;
    let experiments = string_pairs(&raw.experiments, context.limits, Reason::InvalidExperiments)?;

    let route = context.catalogue.route(event_type);
    if route.needs_amount && amount.is_none() {
        return Err(Reason::MissingAmount);
    }
    if route.needs_integer_value || route.needs_histogram_value {
        let Some(value) = value else {
            return Err(Reason::MissingValue);
        };
        if route.needs_integer_value {
            match (raw.value.as_ref(), value_integer) {
                (_, Some(_)) => {}
                (Some(Scalar::Int(_)), None) => return Err(Reason::ValueOutOfRange),
                _ => return Err(Reason::ValueNotInteger),
            }
        }
        if route.needs_histogram_value
            && !(0.0..=context.limits.histogram_value_max as f64).contains(&value.round())
        {
            return Err(Reason::ValueOutOfRange);
        }
    }
    Ok(ValidEvent {
        id: id.to_string(),
        event_type: event_type.to_string(),
        ts_ms,
        amount,
        value,
        value_integer,
        dims,
        experiments,
        route,
    })
}

#[cfg(test)]
mod tests {
    use super::super::catalogue::{MetricDef, MetricKind, SumField};
    use super::*;

    #[test]
    fn minor_digits_come_from_iso_4217() {
        assert_eq!(currency_minor_digits("JPY"), Some(0));
        assert_eq!(currency_minor_digits("USD"), Some(2));
        assert_eq!(currency_minor_digits("BHD"), Some(3));
        // gold has no minor unit; ABC is no currency
        assert_eq!(currency_minor_digits("XAU"), None);
        assert_eq!(currency_minor_digits("ABC"), None);
    }

    const NOW_MS: i64 = 1_763_805_600_000;

    fn catalogue() -> Catalogue {
        let def = |name: &str, kind, types: &[&str]| MetricDef {
            name: name.into(),
            kind,
            types: types.iter().map(|t| t.to_string()).collect(),
            numerator: vec![],
            dims: vec![],
        };
        Catalogue::new(vec![
            def(
                "gmv",
                MetricKind::Sum {
                    field: SumField::Amount,
                },
                &["order.completed"],
            ),
            def("latency", MetricKind::Histogram, &["checkout.completed"]),
            def(
                "units",
                MetricKind::Sum {
                    field: SumField::Value,
                },
                &["units.earned"],
            ),
        ])
    }

    fn limits() -> EventLimits {
        EventLimits {
            max_clock_skew_ms: 300_000,
            dims_per_event_max: 16,
            dim_key_bytes_max: 32,
            dim_value_bytes_max: 128,
            histogram_value_max: 3_600_000,
        }
    }

    /// Validates `json` as received at `received_ms` and judged at `now_ms`.
    fn check_at(json: &str, received_ms: i64, now_ms: i64) -> Result<ValidEvent, Reason> {
        let catalogue = catalogue();
        let limits = limits();
        let context = ValidationContext {
            currency: "USD",
            catalogue: &catalogue,
            limits: &limits,
        };
        let raw = parse_event(json.as_bytes())?;
        validate_event(&raw, &context, received_ms, now_ms)
    }

    fn check(json: &str) -> Result<ValidEvent, Reason> {
        check_at(json, NOW_MS, NOW_MS)
    }

    #[test]
    fn a_complete_order_is_valid() {
        let event = check(
            r#"{"id":"o-1","type":"order.completed","ts":"2025-11-22T10:00:00Z",
                "amount":1250,"currency":"USD","dims":{"device":"ios"},"extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(event.ts_ms, NOW_MS);
        assert_eq!(event.amount, Some(1250));
        assert_eq!(event.dim("device"), Some("ios"));
        assert_eq!(event.route.feeds, 0b001);
    }

    #[test]
    fn epoch_milliseconds_and_absent_ts() {
        let with_ms = check(r#"{"id":"a","type":"x","ts":1763805599123}"#).unwrap();
        assert_eq!(with_ms.ts_ms, 1_763_805_599_123);
        let absent = check(r#"{"id":"a","type":"x"}"#).unwrap();
        assert_eq!(absent.ts_ms, NOW_MS);
    }

    #[test]
    fn each_bad_field_has_its_reason() {
        let cases = [
            (r#"{"id":"a","type":"x""#, Reason::MalformedJson),
            (r#"[1,2]"#, Reason::NotAnObject),
            (r#"{"id":"a","id":"b","type":"x"}"#, Reason::InvalidEvent),
            (r#"{"type":"x"}"#, Reason::MissingId),
            (r#"{"id":7,"type":"x"}"#, Reason::InvalidId),
            (r#"{"id":"","type":"x"}"#, Reason::InvalidId),
            (r#"{"id":"a"}"#, Reason::MissingType),
            (r#"{"id":"a","type":"Order"}"#, Reason::InvalidType),
            (
                r#"{"id":"a","type":"x","ts":"yesterday"}"#,
                Reason::InvalidTs,
            ),
            (r#"{"id":"a","type":"x","ts":1.5}"#, Reason::InvalidTs),
            (
                r#"{"id":"a","type":"x","ts":"2025-11-22T11:00:00Z"}"#,
                Reason::FutureTimestamp,
            ),
            (
                r#"{"id":"a","type":"order.completed","currency":"USD"}"#,
                Reason::MissingAmount,
            ),
            (
                r#"{"id":"a","type":"x","amount":12.5,"currency":"USD"}"#,
                Reason::AmountNotInteger,
            ),
            (
                r#"{"id":"a","type":"x","amount":"12","currency":"USD"}"#,
                Reason::AmountNotInteger,
            ),
            (
                r#"{"id":"a","type":"x","amount":10000000000000000,"currency":"USD"}"#,
                Reason::AmountOutOfRange,
            ),
            (
                r#"{"id":"a","type":"x","amount":1e20,"currency":"USD"}"#,
                Reason::AmountOutOfRange,
            ),
            (
                r#"{"id":"a","type":"x","amount":5}"#,
                Reason::MissingCurrency,
            ),
            (
                r#"{"id":"a","type":"x","amount":5,"currency":"usd"}"#,
                Reason::InvalidCurrency,
            ),
            (
                r#"{"id":"a","type":"x","amount":5,"currency":"EUR"}"#,
                Reason::CurrencyMismatch,
            ),
            (
                r#"{"id":"a","type":"checkout.completed"}"#,
                Reason::MissingValue,
            ),
            (
                r#"{"id":"a","type":"x","value":"fast"}"#,
                Reason::InvalidValue,
            ),
            (
                r#"{"id":"a","type":"checkout.completed","value":-3}"#,
                Reason::ValueOutOfRange,
            ),
            (
                r#"{"id":"a","type":"units.earned","value":2.5}"#,
                Reason::ValueNotInteger,
            ),
            (
                r#"{"id":"a","type":"x","dims":["ios"]}"#,
                Reason::InvalidDims,
            ),
            (
                r#"{"id":"a","type":"x","dims":{"device":1}}"#,
                Reason::InvalidDims,
            ),
            (
                r#"{"id":"a","type":"x","dims":{"device":"__none__"}}"#,
                Reason::InvalidDims,
            ),
            (
                r#"{"id":"a","type":"x","dims":{"d":"a","d":"b"}}"#,
                Reason::InvalidDims,
            ),
            (
                r#"{"id":"a","type":"x","experiments":{"e":"A","e":"B"}}"#,
                Reason::InvalidExperiments,
            ),
            (
                r#"{"id":"a","type":"x","experiments":{"cta":true}}"#,
                Reason::InvalidExperiments,
            ),
            (r#"{"id":"a","type":"x","tenant":5}"#, Reason::InvalidTenant),
        ];
        for (json, reason) in cases {
            assert_eq!(check(json).map(|_| ()), Err(reason), "{json}");
        }
    }

    #[test]
    fn dims_limits_hold_at_the_edges() {
        let key_32 = "k".repeat(32);
        let value_128 = "v".repeat(128);
        let ok = format!(r#"{{"id":"a","type":"x","dims":{{"{key_32}":"{value_128}"}}}}"#);
        assert!(check(&ok).is_ok());
        let long_key = format!(r#"{{"id":"a","type":"x","dims":{{"{key_32}k":"v"}}}}"#);
        assert_eq!(check(&long_key).map(|_| ()), Err(Reason::InvalidDims));
        // control characters in a dim key or value
        for dims in [r#"{"dev\u0000ice": "ios"}"#, r#"{"device": "i\nos"}"#] {
            let line = format!(
                r#"{{"id":"c","type":"order.completed","amount":1,"currency":"USD","dims":{dims}}}"#
            );
            assert_eq!(check(&line).map(|_| ()), Err(Reason::InvalidDims), "{line}");
        }
        let many: Vec<String> = (0..17).map(|i| format!(r#""d{i}":"v""#)).collect();
        let too_many = format!(r#"{{"id":"a","type":"x","dims":{{{}}}}}"#, many.join(","));
        assert_eq!(check(&too_many).map(|_| ()), Err(Reason::InvalidDims));
    }

    #[test]
    fn id_of_128_bytes_is_the_limit() {
        let ok = format!(r#"{{"id":"{}","type":"x"}}"#, "i".repeat(128));
        assert!(check(&ok).is_ok());
        let long = format!(r#"{{"id":"{}","type":"x"}}"#, "i".repeat(129));
        assert_eq!(check(&long).map(|_| ()), Err(Reason::InvalidId));
        // an id with a control character (NUL, newline) is quarantined
        for id in [r#""o\u0000-1""#, r#""o-1\n""#, r#""\u001b[31m""#] {
            let line =
                format!(r#"{{"id":{id},"type":"order.completed","amount":1,"currency":"USD"}}"#);
            assert_eq!(check(&line).map(|_| ()), Err(Reason::InvalidId), "{line}");
        }
    }

    #[test]
    fn an_absent_ts_is_the_receipt_time_and_skew_is_judged_now() {
        let received = check_at(r#"{"id":"a","type":"x"}"#, NOW_MS - 86_400_000, NOW_MS).unwrap();
        assert_eq!(received.ts_ms, NOW_MS - 86_400_000);
        // exactly now + skew is allowed; one millisecond more is not
        let ahead = r#"{"id":"a","type":"x","ts":1763805900000}"#;
        assert!(check_at(ahead, NOW_MS, NOW_MS).is_ok());
        assert_eq!(
            check_at(ahead, NOW_MS - 1, NOW_MS - 1).map(|_| ()),
            Err(Reason::FutureTimestamp)
        );
    }

    #[test]
    fn extreme_timestamps_do_not_panic() {
        for ts in [
            "-9223372036854775808",
            "9223372036854775807",
            "\"0001-01-01T00:00:00Z\"",
            "\"9999-12-31T23:59:59.999999999+14:00\"",
        ] {
            let json = format!(r#"{{"id":"a","type":"x","ts":{ts}}}"#);
            let _ = check(&json);
        }
        let with_offset =
            check(r#"{"id":"a","type":"x","ts":"2025-11-22T11:00:00.1239+01:00"}"#).unwrap();
        assert_eq!(with_offset.ts_ms, NOW_MS + 123);
    }

    #[test]
    fn histogram_values_round_to_the_nearest_integer() {
        let event = check(r#"{"id":"a","type":"checkout.completed","value":211.6}"#).unwrap();
        assert_eq!(event.histogram_value(), 212);
    }
}
