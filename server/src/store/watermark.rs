//! The watermark file beside a sled store: the last write sequence the
//! store acknowledged, so that a store that opens behind it (data lost, an
//! old copy put back) is refused instead of served.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use super::error::StoreError;
use super::layout::read_u64;

/// The last write sequence the store acknowledged, in a small file beside
/// the database, overwritten in place and synced after every commit.
#[derive(Debug)]
pub(super) struct Watermark {
    path: PathBuf,
    file: fs::File,
}

const WATERMARK_MAGIC: &[u8; 8] = b"TSRAWM01";

impl Watermark {
    pub(super) fn open(path: PathBuf) -> Result<(Self, Option<u64>), StoreError> {
        let err = |source| StoreError::Watermark { path: path.display().to_string(), source };
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes).map_err(err)?;
        let seq = match bytes.len() {
            0 => None,
            24 if &bytes[..8] == WATERMARK_MAGIC => {
                let seq = read_u64(Some(&bytes[8..16]));
                let check = read_u64(Some(&bytes[16..24]));
                if check != !seq {
                    return Err(StoreError::Damaged {
                        path: path.display().to_string(),
                        reason: "the watermark file does not check out".into(),
                    });
                }
                Some(seq)
            }
            _ => {
                return Err(StoreError::Damaged {
                    path: path.display().to_string(),
                    reason: "the watermark file is not a Tessera watermark".into(),
                })
            }
        };
        Ok((Self { path, file }, seq))
    }

    pub(super) fn write(&self, seq: u64) -> Result<(), StoreError> {
        let mut record = [0u8; 24];
        record[..8].copy_from_slice(WATERMARK_MAGIC);
        record[8..16].copy_from_slice(&seq.to_be_bytes());
        record[16..24].copy_from_slice(&(!seq).to_be_bytes());
        self.file.write_all_at(&record, 0).and_then(|()| self.file.sync_data()).map_err(|source| {
            StoreError::Watermark { path: self.path.display().to_string(), source }
        })
    }
}
