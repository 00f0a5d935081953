//! An event as the database holds it: its protobuf encoding, deflated
//! when it is large. An agent's answer naming 200 SVIDs is ~23 KB of
//! SPIFFE IDs, entry IDs and serials; deflated, ~8 KB. Much of the
//! store's memory follows the size of the values it holds (a bare sled at
//! a 64 MiB page cache kept ~200 MB for 23 KB values against 83-97 MB for
//! 8 KB ones), and so does its disk.
//!
//! The chain's hashes are over the event's fields, not these bytes, so a
//! stored event is checked the same either way; bytes that do not inflate
//! or decode are a broken chain, never a panic or an unbounded allocation.
//!
//! A commit's events share rows: up to [`ROW_MAX`] events (or
//! [`ROW_BYTES`]) a row, under the first one's sequence number, each
//! encoded as above and prefixed with its length. A row of one event is
//! that event's bytes alone, as older stores hold every event. Each row
//! written costs the database about the same whatever it holds: one row
//! per event was the largest part of what the event log cost issuance.

use std::sync::Mutex;

use miniz_oxide::deflate::core::{
    compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
};
use prost::Message;
use tessera_proto::types::Event;

use crate::store::sled::row_sizes;
use crate::store::StoreError;

/// Encodings at least this long are deflated (a server's own events, a
/// few hundred bytes each, are kept as they are: nothing to gain).
const DEFLATE_FROM: usize = 1024;

/// First byte of a deflated event (zlib: its checksum finds damage). A
/// protobuf encoding never starts with it (field number 0 does not
/// exist), and an event's always starts with its sequence number's tag.
const DEFLATED: u8 = 0;

/// First byte of a row holding several events: like `DEFLATED`, no
/// protobuf encoding starts with it (field number 0).
const GROUP: u8 = 2;

/// Events a row holds at most.
pub(super) const ROW_MAX: usize = 64;

/// Fastest deflate level: the gain is in the entropy coding of hex IDs.
const LEVEL: u8 = 1;

/// Largest event inflated: four times the largest request the server
/// takes. A larger event (none is made) is stored plain, so that what is
/// stored can always be read back.
const MAX_INFLATED: usize = 4 * tessera_common::rules::MAX_MESSAGE_BYTES;

/// The bytes stored for `e`.
#[cfg(test)]
pub(super) fn encode(e: &Event) -> Vec<u8> {
    stored(e.encode_to_vec())
}

/// The bytes stored for an event encoded as `plain`.
fn stored(plain: Vec<u8>) -> Vec<u8> {
    if plain.len() < DEFLATE_FROM || plain.len() >= MAX_INFLATED {
        return plain;
    }
    deflate(&plain).unwrap_or(plain)
}

/// The one compressor, reset for each event: a new one allocates ~300 KB
/// of tables (a reset zeroes them as a new one does, without the
/// allocation), at the soak's ~11 large events a second the server's
/// largest allocation churn. Events are chained one commit at a time,
/// under the event lock, so it is never contended.
static COMPRESSOR: Mutex<Option<CompressorOxide>> = Mutex::new(None);

/// `DEFLATED` and `plain` deflated, or None when that is not shorter.
fn deflate(plain: &[u8]) -> Option<Vec<u8>> {
    let mut slot = COMPRESSOR.lock().unwrap_or_else(|e| e.into_inner());
    let compressor = slot.get_or_insert_with(|| {
        // Zlib (a positive window size), the default strategy: what
        // `compress_to_vec_zlib` makes.
        CompressorOxide::new(create_comp_flags_from_zip_params(LEVEL.into(), 1, 0))
    });
    compressor.reset();
    // Room for less than the plain encoding only (the marker byte and at
    // most `plain.len() - 2` deflated): anything as long is stored plain,
    // so a compressor that runs out of room has its answer.
    let mut stored = vec![0u8; plain.len() - 1];
    stored[0] = DEFLATED;
    let (status, read, written) = compress(compressor, plain, &mut stored[1..], TDEFLFlush::Finish);
    if status != TDEFLStatus::Done || read != plain.len() {
        return None;
    }
    stored.truncate(1 + written);
    Some(stored)
}

/// The rows storing `events` (chained, consecutive sequence numbers):
/// each is its first event's sequence number and its bytes.
#[cfg(test)]
pub(super) fn encode_rows(events: &[Event]) -> Vec<(u64, Vec<u8>)> {
    rows(events, events.iter().map(Message::encode_to_vec).collect())
}

/// The rows storing `events`, each encoded as `plain` says (what
/// `schema::seal` returned as it chained it).
pub(super) fn rows(events: &[Event], plain: Vec<Vec<u8>>) -> Vec<(u64, Vec<u8>)> {
    debug_assert_eq!(events.len(), plain.len(), "an encoding for each event");
    let encoded: Vec<Vec<u8>> = plain.into_iter().map(stored).collect();
    // A row of several is the `GROUP` byte, then each event behind its
    // length: counted as written, up to sled's row size (`row_sizes`).
    let lens =
        encoded.iter().map(|one| prost::encoding::encoded_len_varint(one.len() as u64) + one.len());
    let sizes = row_sizes(lens, ROW_MAX, 1);
    let mut events = events.iter().zip(encoded);
    let mut rows = Vec::with_capacity(sizes.len());
    for n in sizes {
        let mut row = events.by_ref().take(n);
        // Every row holds one event or more.
        let Some((first, one)) = row.next() else { break };
        let row = std::iter::once(one).chain(row.map(|(_, one)| one)).collect();
        rows.push((first.seq, row_bytes(row)));
    }
    rows
}

/// One event's bytes alone, or `GROUP` and each length-prefixed.
fn row_bytes(mut events: Vec<Vec<u8>>) -> Vec<u8> {
    if events.len() == 1 {
        return events.pop().unwrap_or_default();
    }
    let mut out = Vec::with_capacity(1 + events.iter().map(|e| e.len() + 3).sum::<usize>());
    out.push(GROUP);
    for e in &events {
        prost::encoding::encode_varint(e.len() as u64, &mut out);
        out.extend_from_slice(e);
    }
    out
}

/// The events of the row stored under `seq` (its first one's), in order.
pub(super) fn decode_row(bytes: &[u8], seq: u64) -> Result<Vec<Event>, StoreError> {
    let parts = split_row(bytes, seq)?;
    (seq..).zip(parts).map(|(seq, one)| decode(one, seq)).collect()
}

/// How many events the row stored under `seq` holds, and its last one
/// (the chain's head when the row is the last: the others stay encoded).
pub(super) fn last_of_row(bytes: &[u8], seq: u64) -> Result<(u64, Event), StoreError> {
    let mut parts = split_row(bytes, seq)?;
    let n = parts.len() as u64;
    let last = parts.pop().unwrap_or_default();
    Ok((n, decode(last, seq + n - 1)?))
}

/// Each event's stored bytes in a row (at least one, at most `ROW_MAX`).
fn split_row(bytes: &[u8], seq: u64) -> Result<Vec<&[u8]>, StoreError> {
    let Some((&GROUP, mut rest)) = bytes.split_first() else {
        return Ok(vec![bytes]);
    };
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: format!("event {seq}"),
        reason: format!("the row of events from {seq} {reason}"),
    };
    let mut out = Vec::new();
    while !rest.is_empty() {
        if out.len() >= ROW_MAX {
            return Err(corrupt(&format!("holds more than {ROW_MAX} events")));
        }
        let len = prost::encoding::decode_varint(&mut rest).map_err(|_| corrupt("is cut short"))?;
        let len = usize::try_from(len).map_err(|_| corrupt("is cut short"))?;
        if len > rest.len() {
            return Err(corrupt("is cut short"));
        }
        let (one, tail) = rest.split_at(len);
        out.push(one);
        rest = tail;
    }
    if out.is_empty() {
        return Err(corrupt("is empty"));
    }
    Ok(out)
}

/// The event stored as `bytes` under sequence number `seq`.
pub(super) fn decode(bytes: &[u8], seq: u64) -> Result<Event, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: format!("event {seq}"), reason };
    match bytes.split_first() {
        Some((&DEFLATED, deflated)) => {
            let plain =
                miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(deflated, MAX_INFLATED)
                    .map_err(|e| corrupt(format!("does not inflate: {e}")))?;
            Event::decode(plain.as_slice()).map_err(|e| corrupt(e.to_string()))
        }
        _ => Event::decode(bytes).map_err(|e| corrupt(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn answer(ids: usize) -> Event {
        Event {
            seq: 7,
            kind: "workload.x509".into(),
            spiffe_ids: (0..ids).map(|i| format!("spiffe://example.org/w/{i}")).collect(),
            entry_ids: (0..ids)
                .map(|i| format!("{:032x}", (i as u128) * 0x9e37_79b9_7f4a_7c15))
                .collect(),
            ..Default::default()
        }
    }

    /// A large event is stored deflated and read back the same; a small
    /// one as its plain encoding (which older stores hold for every event).
    #[test]
    fn large_events_are_deflated_and_read_back_the_same() {
        let big = answer(200);
        let stored = encode(&big);
        assert_eq!(stored[0], DEFLATED);
        assert!(stored.len() * 2 < big.encode_to_vec().len(), "{} bytes", stored.len());
        assert_eq!(decode(&stored, 7).unwrap(), big);
        let small = answer(1);
        assert_eq!(encode(&small), small.encode_to_vec());
        assert_eq!(decode(&small.encode_to_vec(), 7).unwrap(), small);
    }

    /// The reused compressor makes the bytes a fresh one makes, event after
    /// event (a reset forgets the previous event, including one it gave up
    /// on for want of room), and incompressible events are stored plain.
    #[test]
    fn the_reused_compressor_makes_what_a_fresh_one_makes() {
        // xorshift64*: bytes deflate cannot shorten.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect();
        let hexed = Event { seq: 9, before: hex::encode(&noise), ..Default::default() };
        let incompressible = Event { seq: 9, hash: noise, ..Default::default() };
        for e in [answer(200), answer(20), hexed, incompressible.clone(), answer(200), answer(100)]
        {
            let plain = e.encode_to_vec();
            let fresh = miniz_oxide::deflate::compress_to_vec_zlib(&plain, LEVEL);
            let stored = encode(&e);
            if fresh.len() + 1 < plain.len() {
                assert_eq!(stored[0], DEFLATED);
                assert_eq!(&stored[1..], fresh.as_slice());
            } else {
                assert_eq!(stored, plain);
            }
            assert_eq!(decode(&stored, e.seq).unwrap(), e);
        }
        assert!(encode(&incompressible) == incompressible.encode_to_vec(), "stored plain");
    }

    /// Damaged or hostile bytes are an error naming the event, never a
    /// panic, and never inflated past the bound.
    #[test]
    fn damaged_bytes_are_an_error() {
        let mut stored = encode(&answer(200));
        let middle = stored.len() / 2;
        stored[middle] ^= 0xff;
        assert!(decode(&stored, 7).is_err_and(|e| e.to_string().contains("event 7")));
        assert!(decode(&stored[..stored.len() / 3], 7).is_err());
        assert!(decode(&[DEFLATED], 7).is_err());
        // A bomb: 64 MiB of zeros deflates to a few tens of KB.
        let bomb = miniz_oxide::deflate::compress_to_vec_zlib(&vec![0u8; MAX_INFLATED + 1], 9);
        let mut stored = vec![DEFLATED];
        stored.extend_from_slice(&bomb);
        assert!(decode(&stored, 7).is_err_and(|e| e.to_string().contains("inflate")));
    }
}
