//! The crate's public `kv` module, as it was before the key-value layer
//! moved into the store's folder: `kv.rs`, and the sled database under it.

pub use super::kv::*;
pub use super::sled::{SledKv, ROW_BYTES};
