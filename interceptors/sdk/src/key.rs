//! A plugin's key, read from the key file named in its config and never shown anywhere
//! (the block and frame encryption plugins use it; so may yours).
//!
//! ```no_run
//! let key = interceptor_sdk::key::read_key_file(std::path::Path::new("disk.key"))?;
//! assert_eq!(key.0.len(), 32);
//! # Ok::<(), String>(())
//! ```

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A 256-bit key. Its `Debug` output hides the bytes.
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// The most bytes a key file may hold: 64 hex digits with room for whitespace around them.
pub const MAX_KEY_FILE_BYTES: u64 = 256;

/// Reads a key file: exactly 32 raw bytes, or 64 hex digits (surrounding whitespace allowed).
/// Only a regular file of at most [`MAX_KEY_FILE_BYTES`] is read: it is opened without
/// blocking (a FIFO must not wait for a writer: that would hang `create`, and under the API
/// its edit lock) and never read past that size (`/dev/zero` would never end).
/// Error messages name the file and what is wrong with it, never its contents.
pub fn read_key_file(path: &Path) -> Result<Key, String> {
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("key file {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("key file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("key file {shown} is not a regular file"));
    }
    let mut raw = Vec::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| format!("key file {shown}: {e}"))?;
    if raw.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "key file {shown} is larger than a key ({} bytes or more)",
            MAX_KEY_FILE_BYTES + 1
        ));
    }
    parse_key(&raw).map_err(|why| format!("key file {shown}: {why}"))
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

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("enc-key-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `read_key_file(path)` on another thread: its answer, or None if it did not answer
    /// within 10 s (it blocked or kept reading).
    fn read_within_10s(path: &Path) -> Option<Result<Key, String>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(read_key_file(&path));
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).ok()
    }

    #[test]
    fn dev_zero_is_refused_at_once() {
        let e = read_within_10s(Path::new("/dev/zero"))
            .expect("reading /dev/zero must not go on")
            .unwrap_err();
        assert_eq!(e, "key file /dev/zero is not a regular file");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let fifo = temp_dir("fifo").join("key.fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_within_10s(&fifo)
            .expect("opening a FIFO must not block")
            .unwrap_err();
        assert!(e.ends_with("is not a regular file"), "{e}");
        assert!(e.contains(&*fifo.to_string_lossy()), "{e}");
        std::fs::remove_file(&fifo).unwrap();
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = temp_dir("dir");
        let e = read_key_file(&dir).unwrap_err();
        assert!(e.ends_with("is not a regular file"), "{e}");
    }

    #[test]
    fn a_file_larger_than_a_key_is_refused_and_256_bytes_are_read() {
        let dir = temp_dir("size");
        let big = dir.join("big.key");
        std::fs::write(&big, "secret".repeat(10_000)).unwrap();
        let e = read_key_file(&big).unwrap_err();
        assert_eq!(
            e,
            format!(
                "key file {} is larger than a key (257 bytes or more)",
                big.display()
            )
        );
        let padded = dir.join("padded.key");
        let text = format!("{}{}", "0b".repeat(32), " ".repeat(192));
        assert_eq!(text.len(), 256);
        std::fs::write(&padded, &text).unwrap();
        assert_eq!(read_key_file(&padded).unwrap().0, [11u8; 32]);
        std::fs::write(&padded, format!("{text}\n")).unwrap();
        assert!(read_key_file(&padded).is_err());
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
