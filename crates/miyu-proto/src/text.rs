//! The one text encoding of binary values users see: lowercase base32 without padding.

use data_encoding::BASE32_NOPAD;

pub(crate) fn encode(bytes: &[u8]) -> String {
    BASE32_NOPAD.encode(bytes).to_ascii_lowercase()
}

/// Decodes exactly `N` bytes, accepting either letter case.
pub(crate) fn decode_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    // Reject early: the decoder would otherwise allocate for arbitrarily long input.
    if text.len() != BASE32_NOPAD.encode_len(N) {
        return None;
    }
    let bytes = BASE32_NOPAD
        .decode(text.to_ascii_uppercase().as_bytes())
        .ok()?;
    bytes.try_into().ok()
}

/// Decodes between `min` and `max` bytes, accepting either letter case.
pub(crate) fn decode_vec(text: &str, min: usize, max: usize) -> Option<Vec<u8>> {
    if text.len() < BASE32_NOPAD.encode_len(min) || text.len() > BASE32_NOPAD.encode_len(max) {
        return None;
    }
    let bytes = BASE32_NOPAD
        .decode(text.to_ascii_uppercase().as_bytes())
        .ok()?;
    (min..=max).contains(&bytes.len()).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_wrong_lengths() {
        let value = [7u8; 16];
        let text = encode(&value);
        assert_eq!(text.len(), 26);
        assert_eq!(decode_array::<16>(&text), Some(value));
        assert_eq!(decode_array::<16>(&text.to_ascii_uppercase()), Some(value));
        assert_eq!(decode_array::<32>(&text), None);
        assert_eq!(decode_array::<16>("!!!!!!!!!!!!!!!!!!!!!!!!!!"), None);
    }
}
