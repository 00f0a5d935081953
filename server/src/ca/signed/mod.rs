//! What the CA signs, written as DER without a certificate builder:
//! `svid.rs` (an X509-SVID), `crl.rs` (a CRL), `parts.rs` (what both
//! share: the issuer's template made once per CA, the signature's
//! wrapping, times, headers and lengths, the error).

mod crl;
mod parts;
mod svid;

pub use crl::{write_crl, CrlEntry, CrlError, CrlFields};
pub use parts::{DerError, IssuerTemplate};
pub use svid::{write_svid, SvidFields};
