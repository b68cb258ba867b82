//! Lower-case hex, written a byte pair at a time.
//!
//! The `hex` crate encodes through a `char` iterator collected into a `String`; ids are
//! encoded several times per request, and that iterator was about 1% of the server's CPU
//! at full load (issue 17).

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` to `out` as lower-case hex.
pub fn push_lower(out: &mut String, bytes: &[u8]) {
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// `bytes` as lower-case hex.
pub fn lower(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_lower(&mut out, bytes);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_the_hex_crate(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            prop_assert_eq!(super::lower(&bytes), hex::encode(&bytes));
            let mut out = String::from("0");
            super::push_lower(&mut out, &bytes);
            prop_assert_eq!(out, format!("0{}", hex::encode(&bytes)));
        }
    }

    #[test]
    fn every_nibble_has_its_digit() {
        assert_eq!(
            super::lower(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]),
            "0123456789abcdef"
        );
        assert_eq!(super::lower(&[]), "");
    }
}
