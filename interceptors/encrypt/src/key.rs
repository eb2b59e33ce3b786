//! The instance's key: read from the key file named in its config, never shown anywhere.

use std::path::Path;

/// A 256-bit key. Its `Debug` output hides the bytes.
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Reads a key file: exactly 32 raw bytes, or 64 hex digits (surrounding whitespace allowed).
/// Error messages name the file and what is wrong with it, never its contents.
pub fn read_key_file(path: &Path) -> Result<Key, String> {
    let raw = std::fs::read(path).map_err(|e| format!("key file {}: {e}", path.display()))?;
    parse_key(&raw).map_err(|why| format!("key file {}: {why}", path.display()))
}

fn parse_key(raw: &[u8]) -> Result<Key, &'static str> {
    if raw.len() == 32 {
        let mut k = [0u8; 32];
        k.copy_from_slice(raw);
        return Ok(Key(k));
    }
    let text = raw.trim_ascii();
    if text.len() != 64 {
        return Err("must hold 32 raw bytes or 64 hex digits");
    }
    let mut k = [0u8; 32];
    for (byte, pair) in k.iter_mut().zip(text.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16).ok_or("is not valid hex");
        *byte = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
    }
    Ok(Key(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_hex_keys_are_accepted_and_nothing_else() {
        assert_eq!(parse_key(&[7u8; 32]).unwrap().0, [7u8; 32]);
        let hex = format!("{}\n", "0a".repeat(32));
        assert_eq!(parse_key(hex.as_bytes()).unwrap().0, [10u8; 32]);
        assert!(parse_key(&[7u8; 31]).is_err());
        assert!(parse_key("zz".repeat(32).as_bytes()).is_err());
        assert!(parse_key(b"").is_err());
    }

    #[test]
    fn errors_never_contain_the_key() {
        let dir = std::env::temp_dir().join(format!("enc-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.key");
        std::fs::write(&f, "secretsecretsecret").unwrap();
        let e = read_key_file(&f).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(format!("{:?}", Key([1; 32])), "Key(..)");
    }
}
