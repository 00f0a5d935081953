//! Certificate serial numbers.

use ring::rand::{SecureRandom, SystemRandom};

/// A random positive serial number of 128 bits (top bit clear, never zero-led).
pub fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    // SystemRandom only fails if the OS has no entropy source at all; then
    // fall back to the clock rather than issue a fixed serial.
    if SystemRandom::new().fill(&mut serial).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        serial = nanos.to_be_bytes();
    }
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}
