//! Certificate serial numbers, and the random bytes of serials and `jti`s.

use std::cell::RefCell;

use ring::rand::{SecureRandom, SystemRandom};

/// Bytes a thread draws from the OS at once for [`fill_random`]: one
/// system call per 32 serials instead of one each, and little held
/// unissued (a restored VM snapshot would repeat at most this much).
const POOL_BYTES: usize = 512;

/// A thread's random bytes not handed out yet: `bytes[used..]`.
struct Pool {
    bytes: Box<[u8; POOL_BYTES]>,
    used: usize,
}

thread_local! {
    static POOL: RefCell<Pool> =
        RefCell::new(Pool { bytes: Box::new([0; POOL_BYTES]), used: POOL_BYTES });
}

/// Fills `out` with the OS's random bytes, drawn 512 bytes at a time per
/// thread: signing asks for 16 bytes per X509-SVID and 8 per JWT-SVID,
/// and one `getrandom` call for each was a measurable share of a token's
/// cost. Every byte is handed out once and never leaves its thread's pool
/// otherwise; nothing of a refill that failed is handed out. Fails only
/// if the OS has no entropy source at all.
fn fill_random(out: &mut [u8]) -> Result<(), ring::error::Unspecified> {
    if out.len() > POOL_BYTES / 4 {
        return SystemRandom::new().fill(out);
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if POOL_BYTES - pool.used < out.len() {
            // Spent until the refill has succeeded.
            pool.used = POOL_BYTES;
            SystemRandom::new().fill(&mut pool.bytes[..])?;
            pool.used = 0;
        }
        let start = pool.used;
        out.copy_from_slice(&pool.bytes[start..start + out.len()]);
        // Handed out: not kept where a later read of the pool could find it.
        pool.bytes[start..start + out.len()].fill(0);
        pool.used += out.len();
        Ok(())
    })
}

/// Fills `out` with random bytes ([`fill_random`]); if the OS has no
/// entropy source at all, with the low bytes of the clock's nanoseconds
/// (big-endian) rather than a fixed value.
pub fn random_or_clock(out: &mut [u8]) {
    if fill_random(out).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1)
            .to_be_bytes();
        let n = out.len().min(nanos.len());
        let start = out.len() - n;
        out[start..].copy_from_slice(&nanos[nanos.len() - n..]);
    }
}

/// A random positive serial number of 128 bits (top bit clear, never zero-led).
pub fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    random_or_clock(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_handed_out_once_across_refills() {
        // Enough 16-byte draws to empty the pool several times, with odd
        // sizes between them so that draws straddle a refill.
        let mut seen = std::collections::HashSet::new();
        for i in 0..2_000 {
            let serial = random_serial();
            assert_eq!(serial[0] & 0xc0, 0x40, "positive, never zero-led");
            assert!(seen.insert(serial), "serial {i} repeated");
            let mut odd = vec![0u8; 1 + i % 7];
            fill_random(&mut odd).unwrap();
        }
        // A request larger than the pool's share goes to the OS at once.
        let (mut a, mut b) = ([0u8; POOL_BYTES], [0u8; POOL_BYTES]);
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != 0));
    }

    #[test]
    fn threads_draw_different_bytes() {
        let draw = || {
            let mut out = [0u8; 32];
            fill_random(&mut out).unwrap();
            out
        };
        let other = std::thread::spawn(draw).join().unwrap();
        assert_ne!(draw(), other);
    }
}
