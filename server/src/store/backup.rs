//! Backups: a consistent copy of every record in a checksummed file, and
//! its restore into an empty data directory.

use std::io::{Read, Write};
use std::path::Path;

use super::error::StoreError;
use super::kv::{Op, Pairs};
use super::kv_store::KvStore;
use super::layout::{t, TREE_NAMES};
use super::StoreReport;

impl KvStore {
    /// Restores a backup written by [`Store::backup`](super::Store::backup)
    /// into `dir` (sled), which must hold no store yet.
    pub fn restore(dir: &Path, input: &mut dyn Read) -> Result<StoreReport, StoreError> {
        let records = read_backup(input)?;
        if dir.join("db").exists() || dir.join("conf").exists() {
            return Err(StoreError::Backup(format!(
                "{} already holds a store; move it aside first",
                dir.display()
            )));
        }
        let (store, _) = Self::open_unchecked(dir)?;
        let ops =
            records.into_iter().map(|(tree, key, value)| Op::Put(t(tree), key, value)).collect();
        store.kv.apply(ops)?;
        store.kv.flush()?;
        let report = store.check()?;
        if let Some(watermark) = &store.watermark {
            watermark.write(report.write_seq)?;
        }
        Ok(report)
    }

    pub(super) fn backup(&self, out: &mut dyn Write) -> Result<(), StoreError> {
        // Under the lock: a copy of one moment, while reads go on.
        write_backup(&self.dump()?, out)
    }
}

const BACKUP_MAGIC: &[u8; 16] = b"TESSERA-BACKUP-1";

/// Writes every record of `trees` as `magic, (tree u8, key len u32, key,
/// value len u32, value)*, 0xFF, sha256 of all before`.
fn write_backup(trees: &[Pairs], out: &mut dyn Write) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Backup(e.to_string());
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut put = |bytes: &[u8], out: &mut dyn Write| -> Result<(), StoreError> {
        hash.update(bytes);
        out.write_all(bytes).map_err(io)
    };
    put(BACKUP_MAGIC, out)?;
    for (i, tree) in trees.iter().enumerate() {
        for (key, value) in tree {
            put(&[i as u8], out)?;
            for part in [key.as_slice(), value.as_slice()] {
                let len = u32::try_from(part.len())
                    .map_err(|_| StoreError::Backup("record too large".into()))?;
                put(&len.to_be_bytes(), out)?;
                put(part, out)?;
            }
        }
    }
    put(&[0xFF], out)?;
    out.write_all(hash.finish().as_ref()).map_err(io)?;
    out.flush().map_err(io)
}

type BackupRecord = (usize, Vec<u8>, Vec<u8>);

fn read_backup(input: &mut dyn Read) -> Result<Vec<BackupRecord>, StoreError> {
    let mut bytes = Vec::new();
    input.read_to_end(&mut bytes).map_err(|e| StoreError::Backup(e.to_string()))?;
    let bad = |why: &str| StoreError::Backup(format!("not a whole Tessera backup: {why}"));
    if bytes.len() < BACKUP_MAGIC.len() + 33 || &bytes[..BACKUP_MAGIC.len()] != BACKUP_MAGIC {
        return Err(bad("wrong header"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if ring::digest::digest(&ring::digest::SHA256, body).as_ref() != digest {
        return Err(bad("checksum mismatch (truncated or altered)"));
    }
    let mut records = Vec::new();
    let mut at = BACKUP_MAGIC.len();
    let take = |n: usize, at: &mut usize| -> Result<Vec<u8>, StoreError> {
        let end = at
            .checked_add(n)
            .filter(|end| *end <= body.len())
            .ok_or_else(|| bad("record runs past the end"))?;
        let out = body[*at..end].to_vec();
        *at = end;
        Ok(out)
    };
    loop {
        let tree = take(1, &mut at)?[0];
        if tree == 0xFF {
            break;
        }
        if usize::from(tree) >= TREE_NAMES.len() {
            return Err(bad("unknown tree"));
        }
        let mut parts = Vec::with_capacity(2);
        for _ in 0..2 {
            let len = read_u32(&take(4, &mut at)?);
            parts.push(take(len as usize, &mut at)?);
        }
        let value = parts.pop().unwrap_or_default();
        let key = parts.pop().unwrap_or_default();
        records.push((usize::from(tree), key, value));
    }
    if at != body.len() {
        return Err(bad("bytes after the end marker"));
    }
    Ok(records)
}

fn read_u32(bytes: &[u8]) -> u32 {
    <[u8; 4]>::try_from(bytes).map(u32::from_be_bytes).unwrap_or(0)
}
