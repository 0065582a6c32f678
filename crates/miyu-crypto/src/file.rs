//! File encryption: a random key per file and the STREAM construction (Hoang, Reyhanitabar,
//! Rogaway and Vizár, "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance",
//! 2015) over ChaCha20-Poly1305, laid out as age lays out its payload. The AEAD is `ring`'s
//! (the same library under the TLS layer), whose assembly runs about twice as fast as a
//! portable implementation; a known-answer test pins the format.
//!
//! The plaintext is cut into chunks of a fixed size (the last one may be shorter, and an empty
//! file is one empty chunk). Chunk `i` is sealed under the nonce `i` (11 bytes, big-endian)
//! followed by one byte that is 1 for the last chunk and 0 otherwise, and the sealed chunks are
//! concatenated. Every chunk is authenticated on its own, so a download can start at any chunk
//! (resumption, `Range` requests); swapping chunks changes their nonces and fails; cutting the
//! blob short leaves a last chunk sealed as "not last", which fails too. The key never serves
//! two files, so nonces never repeat.
//!
//! ```
//! use miyu_crypto::file::{FileCipher, FileKey, Layout, Opener};
//! let key = FileKey::random();
//! let layout = Layout::new(10, 4096).unwrap();
//! let cipher = FileCipher::new(&key, layout);
//! let mut chunk = b"ten bytes!".to_vec();
//! cipher.seal(0, &mut chunk).unwrap();
//! let mut plaintext = Vec::new();
//! let mut opener = Opener::new(FileCipher::new(&key, layout), 0);
//! opener.feed(&chunk, &mut |_, bytes| { plaintext.extend_from_slice(&bytes); Ok(()) }).unwrap();
//! opener.finish().unwrap();
//! assert_eq!(plaintext, b"ten bytes!");
//! ```

use rand::RngCore;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Bytes the AEAD adds to every chunk.
pub const TAG_LEN: u64 = 16;
/// The chunk size new files use.
pub const DEFAULT_CHUNK: u32 = 64 * 1024;
pub const MIN_CHUNK: u32 = 4 * 1024;
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024;
/// The largest file Miyu sends: 4 GiB.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("the chunk size {0} is outside {MIN_CHUNK}..={MAX_CHUNK} bytes")]
    BadChunkSize(u32),
    #[error("the file is larger than 4 GiB")]
    TooLarge,
    #[error("chunk {0} has the wrong length")]
    WrongLength(u64),
    #[error("chunk {0} was altered or does not belong to this file")]
    Tampered(u64),
    #[error("the file is truncated: it ends before its last chunk")]
    Truncated,
    #[error("the file has bytes after its last chunk")]
    TrailingData,
    #[error("writing the plaintext failed: {0}")]
    Sink(String),
}

/// A file's 256-bit key. Zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct FileKey([u8; 32]);

impl FileKey {
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self(key)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(..)")
    }
}

/// The Padmé padding of Nikitin et al. ("Reducing Metadata Leakage from Encrypted Files and
/// Communication with PURBs", PETS 2019): `len` rounded up so that only its top
/// ⌊log₂ ⌊log₂ len⌋⌋ + 1 significant bits remain. A padded length reveals O(log log len) bits
/// of the original and costs at most about 12% (less for large files: 1.6% at 4 GiB).
pub fn padme(len: u64) -> u64 {
    if len < 2 {
        return len;
    }
    let exponent = u64::from(63 - len.leading_zeros());
    let significant = u64::from(64 - exponent.leading_zeros());
    let mask = (1u64 << (exponent - significant)) - 1;
    (len + mask) & !mask
}

/// How a file of a given size is cut into chunks, and where each chunk lies in the plaintext
/// and in the ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    plaintext_len: u64,
    chunk: u32,
}

impl Layout {
    pub fn new(plaintext_len: u64, chunk: u32) -> Result<Self, FileError> {
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
            return Err(FileError::BadChunkSize(chunk));
        }
        if plaintext_len > MAX_FILE_BYTES {
            return Err(FileError::TooLarge);
        }
        Ok(Self {
            plaintext_len,
            chunk,
        })
    }

    pub fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk
    }

    /// How many chunks the file has: at least one.
    pub fn chunks(&self) -> u64 {
        self.plaintext_len.div_ceil(u64::from(self.chunk)).max(1)
    }

    pub fn ciphertext_len(&self) -> u64 {
        self.plaintext_len + self.chunks() * TAG_LEN
    }

    /// What the blob holds: the ciphertext followed by random padding up to [`padme`] of its
    /// length, so that the server learns little of the file's size.
    pub fn padded_len(&self) -> u64 {
        padme(self.ciphertext_len())
    }

    /// Where chunk `index` starts in the plaintext.
    pub fn plaintext_offset(&self, index: u64) -> u64 {
        (index * u64::from(self.chunk)).min(self.plaintext_len)
    }

    /// How many plaintext bytes chunk `index` holds (0 past the end).
    pub fn plaintext_chunk_len(&self, index: u64) -> u64 {
        if index >= self.chunks() {
            return 0;
        }
        (self.plaintext_len - self.plaintext_offset(index)).min(u64::from(self.chunk))
    }

    /// Where chunk `index` starts in the ciphertext (its end, past the last chunk).
    pub fn ciphertext_offset(&self, index: u64) -> u64 {
        if index >= self.chunks() {
            return self.ciphertext_len();
        }
        index * (u64::from(self.chunk) + TAG_LEN)
    }

    /// How many whole chunks `ciphertext_len` bytes of ciphertext hold.
    pub fn whole_chunks_in(&self, ciphertext_len: u64) -> u64 {
        if ciphertext_len >= self.ciphertext_len() {
            return self.chunks();
        }
        ciphertext_len / (u64::from(self.chunk) + TAG_LEN)
    }

    fn is_last(&self, index: u64) -> bool {
        index + 1 == self.chunks()
    }
}

/// Seals and opens the chunks of one file.
pub struct FileCipher {
    aead: LessSafeKey,
    layout: Layout,
}

impl FileCipher {
    pub fn new(key: &FileKey, layout: Layout) -> Self {
        // A 32-byte key is always accepted by ChaCha20-Poly1305.
        #[allow(clippy::expect_used)]
        let key = UnboundKey::new(&CHACHA20_POLY1305, &key.0).expect("a 256-bit key");
        Self {
            // "Less safe" only in that the caller supplies the nonces: here the chunk index,
            // never repeated under a key that serves one file.
            aead: LessSafeKey::new(key),
            layout,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn nonce(&self, index: u64) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[3..11].copy_from_slice(&index.to_be_bytes());
        nonce[11] = u8::from(self.layout.is_last(index));
        Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts chunk `index` in place: `buffer` holds its plaintext and receives the sealed
    /// chunk (the plaintext followed by the tag).
    pub fn seal(&self, index: u64, buffer: &mut Vec<u8>) -> Result<(), FileError> {
        if index >= self.layout.chunks()
            || buffer.len() as u64 != self.layout.plaintext_chunk_len(index)
        {
            return Err(FileError::WrongLength(index));
        }
        let tag = self
            .aead
            .seal_in_place_separate_tag(self.nonce(index), Aad::empty(), buffer)
            .map_err(|_| FileError::WrongLength(index))?;
        buffer.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts sealed chunk `index` in place, leaving its plaintext in `buffer`.
    pub fn open(&self, index: u64, buffer: &mut Vec<u8>) -> Result<(), FileError> {
        if index >= self.layout.chunks()
            || buffer.len() as u64 != self.layout.plaintext_chunk_len(index) + TAG_LEN
        {
            return Err(FileError::WrongLength(index));
        }
        let body_len = buffer.len() - TAG_LEN as usize;
        let tag = Tag::try_from(&buffer[body_len..]).map_err(|_| FileError::WrongLength(index))?;
        buffer.truncate(body_len);
        match self.aead.open_in_place_separate_tag(
            self.nonce(index),
            Aad::empty(),
            tag,
            buffer,
            0..,
        ) {
            Ok(_) => Ok(()),
            Err(_) => {
                buffer.zeroize();
                Err(FileError::Tampered(index))
            }
        }
    }
}

/// Seals a whole plaintext held in memory (a group's ratchet tree, PROTOCOL.md §10.9) in
/// [`DEFAULT_CHUNK`] chunks: the blob to upload, random padding to [`padme`] included.
pub fn seal_all(key: &FileKey, plaintext: &[u8]) -> Result<Vec<u8>, FileError> {
    let layout = Layout::new(plaintext.len() as u64, DEFAULT_CHUNK)?;
    let cipher = FileCipher::new(key, layout);
    let mut blob = Vec::with_capacity(layout.padded_len() as usize);
    for index in 0..layout.chunks() {
        let start = layout.plaintext_offset(index) as usize;
        let end = start + layout.plaintext_chunk_len(index) as usize;
        let mut chunk = plaintext[start..end].to_vec();
        cipher.seal(index, &mut chunk)?;
        blob.extend_from_slice(&chunk);
    }
    let mut padding = vec![0u8; (layout.padded_len() - layout.ciphertext_len()) as usize];
    rand::rngs::OsRng.fill_bytes(&mut padding);
    blob.extend_from_slice(&padding);
    Ok(blob)
}

/// Opens the ciphertext [`seal_all`] made of a `plaintext_len`-byte plaintext: exactly the
/// ciphertext, without its padding.
pub fn open_all(
    key: &FileKey,
    plaintext_len: u64,
    ciphertext: &[u8],
) -> Result<Vec<u8>, FileError> {
    let layout = Layout::new(plaintext_len, DEFAULT_CHUNK)?;
    match (ciphertext.len() as u64).cmp(&layout.ciphertext_len()) {
        std::cmp::Ordering::Less => return Err(FileError::Truncated),
        std::cmp::Ordering::Greater => return Err(FileError::TrailingData),
        std::cmp::Ordering::Equal => {}
    }
    let cipher = FileCipher::new(key, layout);
    let mut plaintext = Vec::with_capacity(plaintext_len as usize);
    for index in 0..layout.chunks() {
        let start = layout.ciphertext_offset(index) as usize;
        let end = layout.ciphertext_offset(index + 1) as usize;
        let mut chunk = ciphertext[start..end].to_vec();
        cipher.open(index, &mut chunk)?;
        plaintext.extend_from_slice(&chunk);
    }
    Ok(plaintext)
}

/// Receives each opened chunk: its index and plaintext (handed over, not copied). An error
/// stops the stream.
pub type ChunkSink<'a> = dyn FnMut(u64, Vec<u8>) -> Result<(), String> + 'a;

/// Opens a stream of ciphertext arriving in pieces of any size, from chunk `first` on, and hands
/// each chunk's plaintext to a sink in order. Nothing unauthenticated ever reaches the sink.
pub struct Opener {
    cipher: FileCipher,
    next: u64,
    pending: Vec<u8>,
}

impl Opener {
    pub fn new(cipher: FileCipher, first: u64) -> Self {
        let capacity = (u64::from(cipher.layout.chunk) + TAG_LEN) as usize;
        Self {
            cipher,
            next: first,
            pending: Vec::with_capacity(capacity),
        }
    }

    /// The next chunk expected.
    pub fn next_chunk(&self) -> u64 {
        self.next
    }

    /// Takes the next piece of ciphertext. The sink gets `(chunk index, plaintext)`.
    pub fn feed(&mut self, mut bytes: &[u8], sink: &mut ChunkSink<'_>) -> Result<(), FileError> {
        while !bytes.is_empty() {
            if self.next >= self.cipher.layout.chunks() {
                return Err(FileError::TrailingData);
            }
            let want = (self.cipher.layout.plaintext_chunk_len(self.next) + TAG_LEN) as usize;
            let take = (want - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == want {
                self.cipher.open(self.next, &mut self.pending)?;
                let capacity = self.pending.capacity();
                let opened = std::mem::replace(&mut self.pending, Vec::with_capacity(capacity));
                sink(self.next, opened).map_err(FileError::Sink)?;
                self.next += 1;
            }
        }
        Ok(())
    }

    /// Checks that the stream ended exactly after the last chunk.
    pub fn finish(self) -> Result<(), FileError> {
        if self.next == self.cipher.layout.chunks() && self.pending.is_empty() {
            Ok(())
        } else {
            Err(FileError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encrypt(key: &FileKey, plaintext: &[u8], chunk: u32) -> (Layout, Vec<u8>) {
        let layout = Layout::new(plaintext.len() as u64, chunk).unwrap();
        let cipher = FileCipher::new(key, layout);
        let mut out = Vec::new();
        for index in 0..layout.chunks() {
            let start = layout.plaintext_offset(index) as usize;
            let len = layout.plaintext_chunk_len(index) as usize;
            let mut buffer = plaintext[start..start + len].to_vec();
            cipher.seal(index, &mut buffer).unwrap();
            assert_eq!(out.len() as u64, layout.ciphertext_offset(index));
            out.extend_from_slice(&buffer);
        }
        assert_eq!(out.len() as u64, layout.ciphertext_len());
        (layout, out)
    }

    fn decrypt(
        key: &FileKey,
        layout: Layout,
        ciphertext: &[u8],
        piece: usize,
    ) -> Result<Vec<u8>, FileError> {
        let mut opener = Opener::new(FileCipher::new(key, layout), 0);
        let mut plaintext = Vec::new();
        for part in ciphertext.chunks(piece.max(1)) {
            opener.feed(part, &mut |_, bytes| {
                plaintext.extend_from_slice(&bytes);
                Ok(())
            })?;
        }
        opener.finish()?;
        Ok(plaintext)
    }

    #[test]
    fn round_trips_at_every_boundary() {
        let key = FileKey::random();
        for len in [0usize, 1, 4095, 4096, 4097, 8192, 10_000] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let (layout, ciphertext) = encrypt(&key, &plaintext, 4096);
            assert_eq!(layout.chunks(), (len as u64).div_ceil(4096).max(1));
            for piece in [1, 100, 4112, 1 << 20] {
                assert_eq!(
                    decrypt(&key, layout, &ciphertext, piece).unwrap(),
                    plaintext
                );
            }
        }
    }

    #[test]
    fn flipped_byte_swapped_chunks_and_wrong_key_fail() {
        let key = FileKey::random();
        let plaintext = vec![5u8; 3 * 4096];
        let (layout, ciphertext) = encrypt(&key, &plaintext, 4096);

        let mut flipped = ciphertext.clone();
        flipped[4112 + 17] ^= 1;
        assert_eq!(
            decrypt(&key, layout, &flipped, 999),
            Err(FileError::Tampered(1))
        );

        let mut swapped = ciphertext.clone();
        swapped[..4112].copy_from_slice(&ciphertext[4112..8224]);
        swapped[4112..8224].copy_from_slice(&ciphertext[..4112]);
        assert_eq!(
            decrypt(&key, layout, &swapped, 999),
            Err(FileError::Tampered(0))
        );

        assert_eq!(
            decrypt(&FileKey::random(), layout, &ciphertext, 999),
            Err(FileError::Tampered(0))
        );
    }

    #[test]
    fn truncation_and_trailing_bytes_are_detected() {
        let key = FileKey::random();
        let plaintext = vec![9u8; 2 * 4096];
        let (layout, ciphertext) = encrypt(&key, &plaintext, 4096);
        // Cut mid-chunk: the stream ends before the last chunk.
        assert_eq!(
            decrypt(&key, layout, &ciphertext[..5000], 64),
            Err(FileError::Truncated)
        );
        // A shorter file's layout over the first chunk only: that chunk was sealed as "not
        // last", so it cannot pass for the end of a file.
        let short = Layout::new(4096, 4096).unwrap();
        assert_eq!(
            decrypt(&key, short, &ciphertext[..4112], 64),
            Err(FileError::Tampered(0))
        );
        let mut longer = ciphertext.clone();
        longer.push(0);
        assert_eq!(
            decrypt(&key, layout, &longer, 64),
            Err(FileError::TrailingData)
        );
    }

    #[test]
    fn decryption_can_start_at_any_chunk() {
        let key = FileKey::random();
        let plaintext: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let (layout, ciphertext) = encrypt(&key, &plaintext, 4096);
        let start = layout.ciphertext_offset(3) as usize;
        let mut opener = Opener::new(FileCipher::new(&key, layout), 3);
        let mut tail = Vec::new();
        opener
            .feed(&ciphertext[start..], &mut |index, bytes| {
                assert!(index >= 3);
                tail.extend_from_slice(&bytes);
                Ok(())
            })
            .unwrap();
        opener.finish().unwrap();
        assert_eq!(tail, plaintext[3 * 4096..]);
        assert_eq!(layout.whole_chunks_in(start as u64 + 10), 3);
        assert_eq!(layout.whole_chunks_in(layout.ciphertext_len()), 5);
    }

    /// The format is fixed: these bytes were produced by an independent implementation of
    /// ChaCha20-Poly1305 (RustCrypto's) with the same nonce layout.
    #[test]
    fn known_answer() {
        let key = FileKey::from_bytes(core::array::from_fn(|i| i as u8));
        let plaintext: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let (_, ciphertext) = encrypt(&key, &plaintext, 4096);
        let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
        assert_eq!(ciphertext.len(), 5032);
        assert_eq!(hex(&ciphertext[..16]), "18b94032a9e3a0d61b68566aa34e4028");
        assert_eq!(
            hex(&ciphertext[4096..4112]),
            "e8ee4fef0cb9917576a5584afcc13c85"
        );
        assert_eq!(
            hex(&ciphertext[ciphertext.len() - 16..]),
            "d7b2c60a711d4859dd2c61eb82bd259a"
        );
    }

    #[test]
    fn padme_rounds_to_few_significant_bits_and_costs_little() {
        assert_eq!(padme(0), 0);
        assert_eq!(padme(16), 16);
        assert_eq!(padme(17), 18);
        // 200 MiB of ciphertext: multiples of 4 MiB.
        assert_eq!(padme(209_766_400), 209_715_200 + 4_194_304);
        for len in [
            100u64,
            5_000,
            1 << 20,
            3_146_496,
            1 << 32,
            (4 << 30) + (1 << 20),
        ] {
            let padded = padme(len);
            assert!(
                padded >= len && padded - len <= len / 8,
                "{len} -> {padded}"
            );
            assert_eq!(padme(padded), padded, "padding is a fixed point");
        }
        // Every length in [2^20, 2^21) pads to one of 2^5 + 1 values: 5 bits leak, not 20.
        let distinct: std::collections::BTreeSet<u64> = ((1u64 << 20)..(1u64 << 21))
            .step_by(97)
            .map(padme)
            .collect();
        assert_eq!(distinct.len(), 33);
        // The largest file fits the server's default limit (4 GiB + 128 MiB).
        let largest = Layout::new(MAX_FILE_BYTES, MIN_CHUNK).unwrap();
        assert!(largest.padded_len() <= (4 << 30) + (128 << 20));
    }

    #[test]
    fn bad_layouts_and_lengths_are_refused() {
        assert_eq!(Layout::new(1, 100), Err(FileError::BadChunkSize(100)));
        assert_eq!(
            Layout::new(MAX_FILE_BYTES + 1, DEFAULT_CHUNK),
            Err(FileError::TooLarge)
        );
        let cipher = FileCipher::new(&FileKey::random(), Layout::new(10, 4096).unwrap());
        assert_eq!(
            cipher.seal(0, &mut vec![0; 9]),
            Err(FileError::WrongLength(0))
        );
        assert_eq!(
            cipher.seal(1, &mut Vec::new()),
            Err(FileError::WrongLength(1))
        );
        assert_eq!(
            cipher.open(0, &mut vec![0; 3]),
            Err(FileError::WrongLength(0))
        );
    }

    #[test]
    fn a_blob_sealed_in_memory_opens_whole_and_fails_when_altered_or_cut() {
        let key = FileKey::random();
        for len in [0usize, 1, 65_536, 65_537, 200_000] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let blob = seal_all(&key, &plaintext).unwrap();
            let layout = Layout::new(len as u64, DEFAULT_CHUNK).unwrap();
            assert_eq!(blob.len() as u64, layout.padded_len());
            let ciphertext = &blob[..layout.ciphertext_len() as usize];
            // The streaming opener reads the same format.
            assert_eq!(decrypt(&key, layout, ciphertext, 4096).unwrap(), plaintext);
            assert_eq!(open_all(&key, len as u64, ciphertext).unwrap(), plaintext);
            assert_eq!(
                open_all(&key, len as u64, &ciphertext[..ciphertext.len() - 1]),
                Err(FileError::Truncated)
            );
            if blob.len() > ciphertext.len() {
                assert_eq!(
                    open_all(&key, len as u64, &blob[..ciphertext.len() + 1]),
                    Err(FileError::TrailingData)
                );
            }
            let mut altered = ciphertext.to_vec();
            altered[0] ^= 1;
            assert!(matches!(
                open_all(&key, len as u64, &altered),
                Err(FileError::Tampered(0))
            ));
            assert!(matches!(
                open_all(&FileKey::random(), len as u64, ciphertext),
                Err(FileError::Tampered(0))
            ));
        }
    }
}
