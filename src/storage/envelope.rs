//! The envelope around everything Tally stores: a magic, a format version, the
//! record kind, the payload length and a CRC-32 of the payload, then the payload
//! (bincode 1.3). Decoding checks all of them and bounds the payload size, so a
//! torn or rotted record is an error, never a panic or a huge allocation.

use serde::de::DeserializeOwned;
use serde::Serialize;

use bincode::Options;

const MAGIC: [u8; 4] = *b"TLY\x01";
/// Bump when a stored shape changes; unknown versions are refused, not
/// misread. Version 2 stores integers as varints (counts, values, amounts
/// and sizes are mostly small: a snapshot's histogram slices took 16 bytes a
/// value and count in version 1, about 4 in version 2, docs/BENCHMARKS.md);
/// version 1, every integer at its full width, is still read.
pub const FORMAT_VERSION: u16 = 2;
const FORMAT_VERSION_FIXINT: u16 = 1;
const HEADER_BYTES: usize = 4 + 2 + 1 + 4 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    WalBatch = 1,
    SnapshotPart = 2,
    SnapshotManifest = 3,
    Quarantined = 4,
    OutboxRecord = 5,
    Rule = 6,
    Experiment = 7,
    /// A tenant's snapshot part that lists its de-dup runs (`SnapshotPart`
    /// is the shape before runs; recovery still reads it).
    SnapshotPartRuns = 8,
    /// A part that also holds the experiments' per-variant counts
    /// (`SnapshotPartRuns` is the shape before them; recovery still reads it).
    SnapshotPartExperiments = 9,
    /// The ids of the de-dup runs a snapshot part lists, beside the part, so
    /// that finding the runs to keep reads a few bytes rather than decoding
    /// every kept snapshot's windows.
    SnapshotRuns = 10,
    /// A `SnapshotPartExperiments` whose windows' seconds and histogram
    /// values are stored as differences from the one before (sorted, so
    /// mostly one byte each as varints): a part is mostly histogram slices,
    /// and it is written again at every snapshot.
    SnapshotPartDeltas = 11,
    /// A `SnapshotPartDeltas` whose windows hold no seconds: their history
    /// is in chunks of its own (`HistoryChunk`), which the part lists and
    /// which a later snapshot lists again while they stay the same.
    SnapshotPartHistory = 12,
    /// One metric's windows over one minute (`snapshot::HistoryChunk`).
    HistoryChunk = 13,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("record is shorter than its header ({0} bytes)")]
    Short(usize),
    #[error("record has no tally magic")]
    Magic,
    #[error("record format version {0} is not {FORMAT_VERSION_FIXINT} or {FORMAT_VERSION}")]
    Version(u16),
    #[error("record kind {found} is not the expected {expected}")]
    Kind { found: u8, expected: u8 },
    #[error("record length {declared} does not match its {actual} payload bytes")]
    Length { declared: usize, actual: usize },
    #[error("record payload of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("record checksum does not match")]
    Checksum,
    #[error("record payload does not decode: {0}")]
    Decode(String),
    #[error("record payload does not encode: {0}")]
    Encode(String),
}

fn options(limit_bytes: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .with_limit(limit_bytes)
}

fn options_fixint(limit_bytes: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(limit_bytes)
}

pub fn encode<T: Serialize>(kind: RecordKind, payload: &T) -> Result<Vec<u8>, EnvelopeError> {
    encode_within(kind, payload, u32::MAX as usize)
}

/// Encodes a record whose payload must stay within `payload_bytes_max`, the
/// limit recovery reads with: a record that could not be read back is refused
/// when written, never skipped after a restart.
pub fn encode_within<T: Serialize>(
    kind: RecordKind,
    payload: &T,
    payload_bytes_max: usize,
) -> Result<Vec<u8>, EnvelopeError> {
    // one pass, straight after the header: bincode's `serialize` walks the
    // payload twice (sizing, then writing) and the body was copied once more;
    // a payload past the limit is refused before it is written
    let mut record = Vec::with_capacity(HEADER_BYTES + 4096);
    record.resize(HEADER_BYTES, 0);
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .serialize_into(&mut record, payload)
        .map_err(|error| EnvelopeError::Encode(error.to_string()))?;
    let body_bytes = record.len() - HEADER_BYTES;
    if body_bytes > payload_bytes_max {
        return Err(EnvelopeError::TooLarge(body_bytes));
    }
    let length = u32::try_from(body_bytes).map_err(|_| EnvelopeError::TooLarge(body_bytes))?;
    let crc = crc32fast::hash(&record[HEADER_BYTES..]);
    let (header, _) = record.split_at_mut(HEADER_BYTES);
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    header[6] = kind as u8;
    header[7..11].copy_from_slice(&length.to_be_bytes());
    header[11..15].copy_from_slice(&crc.to_be_bytes());
    Ok(record)
}

pub fn decode<T: DeserializeOwned>(
    record: &[u8],
    kind: RecordKind,
    payload_bytes_max: usize,
) -> Result<T, EnvelopeError> {
    if record.len() < HEADER_BYTES {
        return Err(EnvelopeError::Short(record.len()));
    }
    let (header, body) = record.split_at(HEADER_BYTES);
    if header[0..4] != MAGIC {
        return Err(EnvelopeError::Magic);
    }
    let version = u16::from_be_bytes([header[4], header[5]]);
    if version != FORMAT_VERSION && version != FORMAT_VERSION_FIXINT {
        return Err(EnvelopeError::Version(version));
    }
    if header[6] != kind as u8 {
        return Err(EnvelopeError::Kind {
            found: header[6],
            expected: kind as u8,
        });
    }
    let declared = u32::from_be_bytes([header[7], header[8], header[9], header[10]]) as usize;
    if declared != body.len() {
        return Err(EnvelopeError::Length {
            declared,
            actual: body.len(),
        });
    }
    if declared > payload_bytes_max {
        return Err(EnvelopeError::TooLarge(declared));
    }
    let checksum = u32::from_be_bytes([header[11], header[12], header[13], header[14]]);
    if crc32fast::hash(body) != checksum {
        return Err(EnvelopeError::Checksum);
    }
    let decoded = if version == FORMAT_VERSION_FIXINT {
        options_fixint(payload_bytes_max as u64).deserialize(body)
    } else {
        options(payload_bytes_max as u64).deserialize(body)
    };
    decoded.map_err(|error| EnvelopeError::Decode(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let record = encode(RecordKind::WalBatch, &(7u64, "gmv".to_string(), -5i128)).unwrap();
        let back: (u64, String, i128) = decode(&record, RecordKind::WalBatch, 1 << 20).unwrap();
        assert_eq!(back, (7, "gmv".to_string(), -5));
    }

    #[test]
    fn a_record_past_the_limit_is_refused_when_written() {
        // a length and 100 one-byte varints
        let big = vec![7u64; 100];
        assert!(matches!(
            encode_within(RecordKind::WalBatch, &big, 100),
            Err(EnvelopeError::TooLarge(101))
        ));
        let record = encode_within(RecordKind::WalBatch, &big, 101).unwrap();
        assert_eq!(
            decode::<Vec<u64>>(&record, RecordKind::WalBatch, 101).unwrap(),
            big
        );
    }

    #[test]
    fn records_of_the_first_version_are_still_read() {
        // version 1: every integer at its full width
        let payload = (
            7u64,
            "gmv".to_string(),
            -5i128,
            vec![(1_764_000_000i64, 3u64)],
        );
        let body = options_fixint(u64::MAX).serialize(&payload).unwrap();
        assert_eq!(body.len(), 8 + 8 + 3 + 16 + 8 + 16);
        let mut record = Vec::new();
        record.extend_from_slice(&MAGIC);
        record.extend_from_slice(&FORMAT_VERSION_FIXINT.to_be_bytes());
        record.push(RecordKind::SnapshotPart as u8);
        record.extend_from_slice(&(body.len() as u32).to_be_bytes());
        record.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        record.extend_from_slice(&body);
        assert_eq!(
            decode::<(u64, String, i128, Vec<(i64, u64)>)>(
                &record,
                RecordKind::SnapshotPart,
                1 << 20
            ),
            Ok(payload.clone())
        );
        // the same payload now: varints
        let now = encode(RecordKind::SnapshotPart, &payload).unwrap();
        assert_eq!(now.len() - HEADER_BYTES, 1 + 1 + 3 + 1 + 1 + 5 + 1);
        assert_eq!(
            decode::<(u64, String, i128, Vec<(i64, u64)>)>(&now, RecordKind::SnapshotPart, 1 << 20),
            Ok(payload)
        );
        // a version never written is refused
        let mut future = now.clone();
        future[4..6].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(
            decode::<(u64, String, i128, Vec<(i64, u64)>)>(
                &future,
                RecordKind::SnapshotPart,
                1 << 20
            ),
            Err(EnvelopeError::Version(3))
        );
    }

    #[test]
    fn every_damage_is_an_error() {
        let record = encode(RecordKind::WalBatch, &vec![1u64, 2, 3]).unwrap();
        let check = |bytes: &[u8]| decode::<Vec<u64>>(bytes, RecordKind::WalBatch, 1 << 20);
        assert!(matches!(
            check(&record[..10]),
            Err(EnvelopeError::Short(10))
        ));
        assert!(matches!(
            check(&record[..record.len() - 1]),
            Err(EnvelopeError::Length { .. })
        ));
        let mut flipped = record.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert_eq!(check(&flipped), Err(EnvelopeError::Checksum));
        let mut magic = record.clone();
        magic[0] = b'X';
        assert_eq!(check(&magic), Err(EnvelopeError::Magic));
        assert!(matches!(
            decode::<Vec<u64>>(&record, RecordKind::SnapshotPart, 1 << 20),
            Err(EnvelopeError::Kind { .. })
        ));
        assert!(matches!(
            decode::<Vec<u64>>(&record, RecordKind::WalBatch, 3),
            Err(EnvelopeError::TooLarge(4))
        ));
    }

    #[test]
    fn a_length_prefix_cannot_force_a_huge_allocation() {
        // a vector claiming 2^60 elements inside a valid envelope
        let body = options(u64::MAX).serialize(&(1u64 << 60)).unwrap();
        let mut record = encode(RecordKind::WalBatch, &0u64).unwrap();
        record.truncate(HEADER_BYTES);
        record[7..11].copy_from_slice(&(body.len() as u32).to_be_bytes());
        record[11..15].copy_from_slice(&crc32fast::hash(&body).to_be_bytes());
        record.extend_from_slice(&body);
        assert!(matches!(
            decode::<Vec<u64>>(&record, RecordKind::WalBatch, 1 << 20),
            Err(EnvelopeError::Decode(_))
        ));
    }
}
