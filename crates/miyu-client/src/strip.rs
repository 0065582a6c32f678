//! Removes privacy-sensitive metadata (EXIF with GPS and serial numbers, XMP, IPTC, comments,
//! thumbnails, trailing data) from JPEG, PNG and WebP images before they are sent, without
//! re-encoding: the compressed image data is copied byte for byte, so the decoded pixels are
//! exactly those of the original.
//!
//! ```
//! use miyu_client::strip::{sniff, strip_metadata};
//! # fn example(photo: Vec<u8>) -> Result<(), miyu_client::strip::StripError> {
//! if let Some(kind) = sniff(&photo) {
//!     let clean = strip_metadata(kind, photo)?;
//!     // send `clean` with the MIME type `kind.mime()`
//! }
//! # Ok(()) }
//! ```
//!
//! What is kept is chosen by an allow-list, so metadata in places this module has never heard
//! of goes too: only what a decoder needs, the colour description (the ICC profile, and in PNG
//! also sRGB, gAMA, cHRM, cICP and the HDR chunks), animation, and the EXIF orientation, which
//! is written anew as a lone tag so that portrait photos are still shown upright. It does not look inside the ICC profile, and it
//! does not touch the pixels: a face or a street sign in the picture stays there.

use img_parts::Bytes;
use img_parts::png::{Png, PngChunk};
use img_parts::riff::{RiffChunk, RiffContent};
use img_parts::webp::WebP;

/// An image format that metadata can be stripped from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
    Webp,
}

impl ImageKind {
    /// The MIME type to send the image with.
    pub fn mime(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::Png => "image/png",
            ImageKind::Webp => "image/webp",
        }
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            ImageKind::Jpeg => "JPEG",
            ImageKind::Png => "PNG",
            ImageKind::Webp => "WebP",
        })
    }
}

/// Recognises an image by its first bytes (give at least 16).
pub fn sniff(prefix: &[u8]) -> Option<ImageKind> {
    if prefix.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageKind::Jpeg)
    } else if prefix.starts_with(PNG_SIGNATURE) {
        Some(ImageKind::Png)
    } else if prefix.starts_with(b"RIFF") && prefix.get(8..12) == Some(b"WEBP") {
        Some(ImageKind::Webp)
    } else {
        None
    }
}

/// Largest image stripped (it is held in memory whole).
pub const MAX_STRIP_BYTES: u64 = 48 * 1024 * 1024;

/// Why an image could not be stripped. Such an image should not be sent as it is: what cannot
/// be parsed cannot be shown to be free of metadata.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StripError {
    /// The caller passed more than [`MAX_STRIP_BYTES`].
    #[error("the image is {size} bytes, more than the {max} bytes that can be stripped", max = MAX_STRIP_BYTES)]
    TooLarge { size: u64 },
    /// The bytes are not a well-formed image of the kind given.
    #[error("not a well-formed {0} image: {1}")]
    Malformed(ImageKind, String),
}

/// Returns the image without its metadata.
///
/// `kind` is the image's real format, as [`sniff`] tells it; bytes of another format are
/// [`StripError::Malformed`]. A JPEG cut short inside its image data is accepted, as decoders
/// show what there is; anything cut short before is refused.
pub fn strip_metadata(kind: ImageKind, bytes: Vec<u8>) -> Result<Vec<u8>, StripError> {
    let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if size > MAX_STRIP_BYTES {
        return Err(StripError::TooLarge { size });
    }
    match kind {
        ImageKind::Jpeg => strip_jpeg(&bytes),
        ImageKind::Png => strip_png(bytes),
        ImageKind::Webp => strip_webp(bytes),
    }
}

const PNG_SIGNATURE: &[u8] = &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

// JPEG marker codes (the byte after 0xFF).
const TEM: u8 = 0x01;
const RST0: u8 = 0xD0;
const RST7: u8 = 0xD7;
const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const APP0: u8 = 0xE0;
const APP1: u8 = 0xE1;
const APP2: u8 = 0xE2;
const APP14: u8 = 0xEE;
const APP15: u8 = 0xEF;
const COM: u8 = 0xFE;

/// Where the EXIF payload starts in a JPEG APP1 segment (and, against the PNG and WebP
/// specifications, in some of their EXIF chunks).
const EXIF_PREFIX: &[u8] = b"Exif\0\0";
/// Bytes of a JFIF APP0 payload before its optional thumbnail: identifier, version, density
/// units, X and Y density, thumbnail width and height.
const JFIF_HEADER_LEN: usize = 14;

/// Walks the JPEG marker by marker, itself rather than with img-parts: img-parts keeps
/// everything after the first scan header as one opaque block, so it could not drop what
/// follows the end of the image (MPF secondary images with their own EXIF, phone trailers,
/// motion-photo videos) nor metadata segments placed between the scans of a progressive JPEG.
/// Everything copied to the output has been looked at; bytes that are neither a known segment
/// nor entropy-coded data are dropped, as decoders skip them too.
fn strip_jpeg(input: &[u8]) -> Result<Vec<u8>, StripError> {
    let malformed = |reason: &str| StripError::Malformed(ImageKind::Jpeg, reason.to_string());
    if input.get(..2) != Some(&[0xFF, SOI]) {
        return Err(malformed("it does not start with a start-of-image marker"));
    }
    let mut output = Vec::with_capacity(input.len());
    output.extend_from_slice(&[0xFF, SOI]);
    let mut position = 2;
    let mut seen_scan = false;
    let mut orientation_written = false;
    loop {
        // A marker is 0xFF (any number of them: fill bytes) and a code; other bytes here are
        // garbage that decoders skip with a warning.
        let Some(offset) = input
            .get(position..)
            .and_then(|rest| rest.iter().position(|&byte| byte == 0xFF))
        else {
            return Err(malformed("the data ends before the end-of-image marker"));
        };
        position += offset;
        while input.get(position) == Some(&0xFF) {
            position += 1;
        }
        let Some(&marker) = input.get(position) else {
            return Err(malformed("the data ends inside a marker"));
        };
        position += 1;
        match marker {
            EOI if seen_scan => {
                output.extend_from_slice(&[0xFF, EOI]);
                // Whatever follows (secondary images, trailers, videos) is dropped.
                return Ok(output);
            }
            EOI => return Err(malformed("it ends before any image data")),
            SOI => return Err(malformed("a second start-of-image marker")),
            TEM | RST0..=RST7 => output.extend_from_slice(&[0xFF, marker]),
            // A stuffed zero outside of entropy-coded data: garbage, skipped.
            0x00 => {}
            0x02..=0xBF => return Err(malformed("a reserved marker")),
            _ => {
                // The length counts itself and the payload.
                let length = match input.get(position..position + 2) {
                    Some(&[high, low]) => usize::from(u16::from_be_bytes([high, low])),
                    _ => return Err(malformed("the data ends inside a segment length")),
                };
                let segment = input
                    .get(position..position + length)
                    .ok_or_else(|| malformed("a segment runs past the end of the data"))?;
                let payload = segment
                    .get(2..)
                    .ok_or_else(|| malformed("a segment length is less than 2"))?;
                position += length;
                match keep_jpeg_segment(marker, payload, &mut orientation_written) {
                    Kept::Whole => {
                        output.extend_from_slice(&[0xFF, marker]);
                        output.extend_from_slice(segment);
                    }
                    Kept::Rewritten(payload) => push_jpeg_segment(&mut output, marker, &payload),
                    Kept::Nothing => {}
                }
                if marker == SOS {
                    seen_scan = true;
                    let end = entropy_coded_end(input, position);
                    output.extend_from_slice(&input[position..end]);
                    position = end;
                    if position == input.len() {
                        // Truncated inside the scan, as some cameras and downloads leave
                        // files; decoders show what there is, so it is sent as it is.
                        return Ok(output);
                    }
                }
            }
        }
    }
}

/// What becomes of a JPEG segment.
enum Kept {
    Whole,
    Rewritten(Vec<u8>),
    Nothing,
}

fn keep_jpeg_segment(marker: u8, payload: &[u8], orientation_written: &mut bool) -> Kept {
    match marker {
        // JFIF tells decoders the colour space; its thumbnail, which may show the picture
        // before it was cropped, is dropped.
        APP0 if payload.starts_with(b"JFIF\0") => {
            let header = payload.get(..JFIF_HEADER_LEN - 2);
            let thumbnail = payload.get(JFIF_HEADER_LEN - 2..).unwrap_or_default();
            match header {
                Some(header) if thumbnail.len() >= 2 && thumbnail != [0, 0] => {
                    let mut without_thumbnail = header.to_vec();
                    without_thumbnail.extend_from_slice(&[0, 0]);
                    Kept::Rewritten(without_thumbnail)
                }
                _ => Kept::Whole,
            }
        }
        APP1 if !*orientation_written && payload.starts_with(EXIF_PREFIX) => {
            match payload.get(EXIF_PREFIX.len()..).and_then(exif_orientation) {
                Some(orientation) => {
                    *orientation_written = true;
                    let mut exif = EXIF_PREFIX.to_vec();
                    exif.extend_from_slice(&orientation_only_exif(orientation));
                    Kept::Rewritten(exif)
                }
                None => Kept::Nothing,
            }
        }
        APP2 if payload.starts_with(b"ICC_PROFILE\0") => Kept::Whole,
        // Adobe's segment says how to convert the colours (YCCK, CMYK, inverted or not).
        APP14 if payload.starts_with(b"Adobe") => Kept::Whole,
        APP0..=APP15 | COM => Kept::Nothing,
        _ => Kept::Whole,
    }
}

fn push_jpeg_segment(output: &mut Vec<u8>, marker: u8, payload: &[u8]) {
    let length = u16::try_from(payload.len() + 2)
        .expect("rewritten payloads (JFIF, orientation) are a few dozen bytes");
    output.extend_from_slice(&[0xFF, marker]);
    output.extend_from_slice(&length.to_be_bytes());
    output.extend_from_slice(payload);
}

/// The end of the entropy-coded data starting at `start`: the position of the 0xFF of the
/// first marker that is neither a stuffed zero nor a restart marker, or the end of the input.
fn entropy_coded_end(input: &[u8], start: usize) -> usize {
    let mut position = start;
    while let Some(offset) = input
        .get(position..)
        .and_then(|rest| rest.iter().position(|&byte| byte == 0xFF))
    {
        position += offset;
        match input.get(position + 1) {
            Some(0x00 | RST0..=RST7) => position += 2,
            // A fill byte: the marker, if any, starts at the last 0xFF.
            Some(0xFF) => position += 1,
            Some(_) => return position,
            None => return input.len(),
        }
    }
    input.len()
}

/// Chunks kept in a PNG: every critical one (a decoder must fail on critical chunks it does
/// not know, so they cannot be metadata), and the ancillary ones that change how the image
/// looks: transparency, colour, HDR, pixel aspect and APNG animation.
const PNG_KEPT_ANCILLARY: &[&[u8; 4]] = &[
    b"tRNS", b"cHRM", b"gAMA", b"iCCP", b"sBIT", b"sRGB", b"cICP", b"mDCV", b"mDCv", b"cLLI",
    b"cLLi", b"bKGD", b"pHYs", b"acTL", b"fcTL", b"fdAT",
];

/// Everything else ancillary goes: tEXt, zTXt and iTXt (where XMP lives), tIME, eXIf (but for
/// its orientation), and private or unknown chunks such as content credentials.
fn strip_png(bytes: Vec<u8>) -> Result<Vec<u8>, StripError> {
    let mut png = Png::from_bytes(Bytes::from(bytes))
        .map_err(|error| StripError::Malformed(ImageKind::Png, error.to_string()))?;
    let mut orientation_written = false;
    let chunks = std::mem::take(png.chunks_mut());
    for chunk in chunks {
        let kind = chunk.kind();
        let critical = kind[0].is_ascii_uppercase();
        if critical || PNG_KEPT_ANCILLARY.contains(&&kind) {
            png.chunks_mut().push(chunk);
        } else if &kind == b"eXIf" && !orientation_written {
            let contents: &[u8] = chunk.contents();
            let tiff = contents.strip_prefix(EXIF_PREFIX).unwrap_or(contents);
            if let Some(orientation) = exif_orientation(tiff) {
                orientation_written = true;
                let exif = Bytes::from(orientation_only_exif(orientation).to_vec());
                png.chunks_mut().push(PngChunk::new(kind, exif));
            }
        }
    }
    // Bytes after IEND are not read by img-parts, so they are not written either.
    Ok(Vec::from(png.encoder().bytes()))
}

/// Chunks kept in a WebP: the image data, alpha, animation and the ICC profile.
const WEBP_KEPT: &[&[u8; 4]] = &[
    b"VP8X", b"VP8 ", b"VP8L", b"ALPH", b"ANIM", b"ANMF", b"ICCP",
];
/// The flags in the first byte of the VP8X chunk that announce EXIF and XMP chunks.
const VP8X_EXIF_FLAG: u8 = 0x08;
const VP8X_XMP_FLAG: u8 = 0x04;

/// Drops every top-level chunk but those in [`WEBP_KEPT`] and the orientation from EXIF, and
/// clears the EXIF and XMP flags of the VP8X header to match (img-parts leaves the XMP flag
/// alone, and only updates the EXIF flag through `set_exif`, which may also drop the VP8X
/// chunk: done here instead, so the header keeps its canvas size and other flags).
fn strip_webp(bytes: Vec<u8>) -> Result<Vec<u8>, StripError> {
    let malformed = |reason: String| StripError::Malformed(ImageKind::Webp, reason);
    let mut webp =
        WebP::from_bytes(Bytes::from(bytes)).map_err(|error| malformed(error.to_string()))?;
    let mut orientation_written = false;
    let chunks = std::mem::take(webp.chunks_mut());
    for chunk in chunks {
        let id = chunk.id();
        if WEBP_KEPT.contains(&&id) {
            webp.chunks_mut().push(chunk);
        } else if &id == b"EXIF" && !orientation_written {
            let orientation = chunk.content().data().and_then(|data| {
                exif_orientation(data.strip_prefix(EXIF_PREFIX).unwrap_or(&data[..]))
            });
            if let Some(orientation) = orientation {
                orientation_written = true;
                let exif = Bytes::from(orientation_only_exif(orientation).to_vec());
                webp.chunks_mut()
                    .push(RiffChunk::new(id, RiffContent::Data(exif)));
            }
        }
    }
    let Some(header) = webp
        .chunks_mut()
        .iter_mut()
        .find(|chunk| &chunk.id() == b"VP8X")
    else {
        // The simple formats have no header to fix, and cannot carry metadata chunks at all.
        return Ok(Vec::from(webp.encoder().bytes()));
    };
    let RiffContent::Data(data) = header.content_mut() else {
        return Err(malformed("the VP8X header is a list".to_string()));
    };
    let Some(&flags) = data.first() else {
        return Err(malformed("the VP8X header is empty".to_string()));
    };
    let mut flags = flags & !(VP8X_EXIF_FLAG | VP8X_XMP_FLAG);
    if orientation_written {
        flags |= VP8X_EXIF_FLAG;
    }
    let mut rewritten = data.to_vec();
    if let Some(first) = rewritten.first_mut() {
        *first = flags;
    }
    *data = Bytes::from(rewritten);
    Ok(Vec::from(webp.encoder().bytes()))
}

/// The EXIF tag that says how to rotate or mirror the stored pixels for display.
const ORIENTATION_TAG: u16 = 0x0112;
const TIFF_SHORT: u16 = 3;

/// The orientation in a TIFF-structured EXIF block (first image directory), if it is set to
/// anything but the default (1, upright) and is valid.
fn exif_orientation(tiff: &[u8]) -> Option<u16> {
    let big_endian = match tiff.get(..4)? {
        b"MM\0*" => true,
        b"II*\0" => false,
        _ => return None,
    };
    let read_u16 = |at: usize| -> Option<u16> {
        let bytes = tiff.get(at..at.checked_add(2)?)?;
        let bytes = [bytes[0], bytes[1]];
        Some(if big_endian {
            u16::from_be_bytes(bytes)
        } else {
            u16::from_le_bytes(bytes)
        })
    };
    let read_u32 = |at: usize| -> Option<u32> {
        let bytes = tiff.get(at..at.checked_add(4)?)?;
        let bytes = [bytes[0], bytes[1], bytes[2], bytes[3]];
        Some(if big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    };
    let directory = usize::try_from(read_u32(4)?).ok()?;
    let entries = read_u16(directory)?;
    (0..usize::from(entries)).find_map(|index| {
        let entry = directory.checked_add(2 + 12 * index)?;
        if read_u16(entry)? != ORIENTATION_TAG
            || read_u16(entry + 2)? != TIFF_SHORT
            || read_u32(entry + 4)? != 1
        {
            return None;
        }
        // A single SHORT sits in the first two bytes of the value field.
        read_u16(entry + 8).filter(|orientation| (2..=8).contains(orientation))
    })
}

/// A big-endian TIFF block holding one directory with one entry: the orientation.
fn orientation_only_exif(orientation: u16) -> [u8; 26] {
    let mut tiff = [0; 26];
    tiff[..4].copy_from_slice(b"MM\0*");
    tiff[4..8].copy_from_slice(&8u32.to_be_bytes());
    tiff[8..10].copy_from_slice(&1u16.to_be_bytes());
    tiff[10..12].copy_from_slice(&ORIENTATION_TAG.to_be_bytes());
    tiff[12..14].copy_from_slice(&TIFF_SHORT.to_be_bytes());
    tiff[14..18].copy_from_slice(&1u32.to_be_bytes());
    tiff[18..20].copy_from_slice(&orientation.to_be_bytes());
    // Two bytes of padding in the value field, then no next directory: zeros.
    tiff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg_segment(marker: u8, payload: &[u8]) -> Vec<u8> {
        let mut segment = vec![0xFF, marker];
        segment.extend_from_slice(&u16::try_from(payload.len() + 2).unwrap().to_be_bytes());
        segment.extend_from_slice(payload);
        segment
    }

    /// A JPEG skeleton: not decodable, but every kind of segment the walker must handle.
    fn jpeg(before_scans: &[Vec<u8>], between_scans: &[Vec<u8>], after_end: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0xFF, SOI];
        for segment in before_scans {
            bytes.extend_from_slice(segment);
        }
        bytes.extend_from_slice(&jpeg_segment(0xDB, &[0; 65]));
        bytes.extend_from_slice(&jpeg_segment(0xC0, &[8, 0, 1, 0, 1, 1, 1, 0x11, 0]));
        bytes.extend_from_slice(&jpeg_segment(SOS, &[1, 1, 0, 0, 63, 0]));
        // Entropy-coded data with a stuffed 0xFF, a restart marker and fill bytes.
        bytes.extend_from_slice(&[0x12, 0xFF, 0x00, 0x34, 0xFF, RST0, 0x56]);
        for segment in between_scans {
            bytes.extend_from_slice(segment);
        }
        bytes.extend_from_slice(&jpeg_segment(SOS, &[1, 1, 0, 0, 63, 0]));
        bytes.extend_from_slice(&[0x78, 0xFF, 0xFF, EOI]);
        bytes.extend_from_slice(after_end);
        bytes
    }

    #[test]
    fn jpeg_keeps_decoding_segments_and_drops_metadata_and_trailers() {
        let jfif = jpeg_segment(APP0, b"JFIF\0\x01\x02\0\0\x48\0\x48\0\0");
        let icc = jpeg_segment(APP2, b"ICC_PROFILE\0\x01\x01profile");
        let adobe = jpeg_segment(APP14, b"Adobe\0\x64\0\0\0\0\x01");
        let input = jpeg(
            &[
                jfif.clone(),
                jpeg_segment(APP1, b"Exif\0\0MM\0*\0\0\0\x08\0\0"),
                jpeg_segment(APP1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"),
                jpeg_segment(APP2, b"MPF\0II*\0"),
                icc.clone(),
                jpeg_segment(0xED, b"Photoshop 3.0\08BIM"),
                adobe.clone(),
                jpeg_segment(COM, b"a comment"),
            ],
            &[
                jpeg_segment(COM, b"between scans"),
                jpeg_segment(APP1, b"Exif\0\0II*\0\x08\0\0\0\0\0"),
            ],
            b"\xFF\xD8 a second image or a trailer",
        );
        let output = strip_jpeg(&input).unwrap();
        let expected = jpeg(&[jfif, icc, adobe], &[], b"");
        assert_eq!(output, expected);
    }

    #[test]
    fn jfif_thumbnail_is_dropped() {
        let mut with_thumbnail = b"JFIF\0\x01\x02\0\0\x48\0\x48\x01\x01".to_vec();
        with_thumbnail.extend_from_slice(&[0xAB; 3]);
        let output = strip_jpeg(&jpeg(&[jpeg_segment(APP0, &with_thumbnail)], &[], b"")).unwrap();
        let without = jpeg(
            &[jpeg_segment(APP0, b"JFIF\0\x01\x02\0\0\x48\0\x48\0\0")],
            &[],
            b"",
        );
        assert_eq!(output, without);
    }

    #[test]
    fn exif_orientation_is_kept_alone() {
        // Little-endian EXIF with a camera make, the orientation (6: rotate 90°) and more.
        let mut tiff = b"II*\0\x08\0\0\0\x02\0".to_vec();
        tiff.extend_from_slice(&[0x0F, 0x01, 2, 0, 4, 0, 0, 0, b'A', b'c', b'm', 0]);
        tiff.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]);
        tiff.extend_from_slice(&[0; 4]);
        assert_eq!(exif_orientation(&tiff), Some(6));
        let exif = [EXIF_PREFIX, &tiff].concat();
        let output = strip_jpeg(&jpeg(&[jpeg_segment(APP1, &exif)], &[], b"")).unwrap();
        let kept = [EXIF_PREFIX, &orientation_only_exif(6)].concat();
        assert_eq!(output, jpeg(&[jpeg_segment(APP1, &kept)], &[], b""));
        assert_eq!(exif_orientation(&orientation_only_exif(6)), Some(6));
    }

    #[test]
    fn exif_orientation_ignores_default_invalid_and_truncated_values() {
        for orientation in [0, 1, 9] {
            assert_eq!(exif_orientation(&orientation_only_exif(orientation)), None);
        }
        let tiff = orientation_only_exif(3);
        for length in 0..20 {
            assert_eq!(exif_orientation(&tiff[..length]), None, "length {length}");
        }
        // A directory offset far past the end.
        assert_eq!(exif_orientation(b"MM\0*\xFF\xFF\xFF\xF0"), None);
    }

    #[test]
    fn jpeg_truncated_in_the_scan_is_kept_as_it_is() {
        let input = jpeg(&[], &[], b"");
        let scan = input.iter().position(|&byte| byte == 0x12).unwrap();
        let truncated = &input[..scan + 2];
        assert_eq!(strip_jpeg(truncated).unwrap(), truncated);
    }

    #[test]
    fn every_truncation_of_a_header_is_an_error() {
        let input = jpeg(
            &[jpeg_segment(APP1, b"Exif\0\0MM\0*\0\0\0\x08\0\0")],
            &[],
            b"",
        );
        let scan = input
            .windows(2)
            .position(|window| window == [0xFF, SOS])
            .unwrap();
        for length in 0..scan + 8 {
            assert!(strip_jpeg(&input[..length]).is_err(), "length {length}");
        }
    }

    #[test]
    fn malformed_jpegs_are_errors() {
        for input in [
            &b""[..],
            b"\xFF",
            b"\xFF\xD8",
            b"\xFF\xD8\xFF\xD9",
            b"\xFF\xD8\xFF\xD8",
            b"\xFF\xD8\xFF\x05\0\x02",
            b"\xFF\xD8\xFF\xE1\0\x01",
            b"\xFF\xD8\xFF\xE1\0\x10abc",
            b"\x89PNG\r\n\x1a\n",
        ] {
            let error = strip_metadata(ImageKind::Jpeg, input.to_vec()).unwrap_err();
            assert!(
                matches!(error, StripError::Malformed(ImageKind::Jpeg, _)),
                "{input:?}"
            );
        }
    }

    #[test]
    fn garbage_is_an_error_for_every_kind() {
        let garbage: Vec<u8> = (0..4096u32)
            .map(|index| (index.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for kind in [ImageKind::Jpeg, ImageKind::Png, ImageKind::Webp] {
            let error = strip_metadata(kind, garbage.clone()).unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("not a well-formed {kind} image")),
                "{error}"
            );
        }
    }

    #[test]
    fn too_large_is_refused_before_parsing() {
        let size = usize::try_from(MAX_STRIP_BYTES).unwrap() + 1;
        let error = strip_metadata(ImageKind::Png, vec![0; size]).unwrap_err();
        assert!(
            matches!(error, StripError::TooLarge { size: refused } if refused == MAX_STRIP_BYTES + 1)
        );
    }

    fn png_chunk(kind: &[u8; 4], contents: &[u8]) -> PngChunk {
        PngChunk::new(*kind, Bytes::copy_from_slice(contents))
    }

    fn png(chunks: Vec<PngChunk>) -> Vec<u8> {
        let mut bytes = PNG_SIGNATURE.to_vec();
        for chunk in chunks {
            bytes.extend_from_slice(&chunk.encoder().bytes());
        }
        bytes
    }

    #[test]
    fn png_keeps_an_allow_list_of_chunks() {
        let ihdr = png_chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 0, 0, 0, 0]);
        let iccp = png_chunk(b"iCCP", b"icc\0\0compressed");
        let idat = png_chunk(b"IDAT", b"pixels");
        let iend = png_chunk(b"IEND", b"");
        let input = png(vec![
            ihdr.clone(),
            png_chunk(b"eXIf", b"MM\0*\0\0\0\x08\0\0"),
            png_chunk(b"tEXt", b"Comment\0secret"),
            png_chunk(b"zTXt", b"Comment\0\0x"),
            png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x:xmpmeta/>"),
            png_chunk(b"tIME", &[7, 0xE9, 1, 2, 3, 4, 5]),
            png_chunk(b"caBX", b"content credentials"),
            iccp.clone(),
            idat.clone(),
            iend.clone(),
        ]);
        let mut with_trailer = input;
        with_trailer.extend_from_slice(b"after the end");
        let output = strip_metadata(ImageKind::Png, with_trailer).unwrap();
        assert_eq!(output, png(vec![ihdr, iccp, idat, iend]));
    }

    #[test]
    fn png_with_a_bad_checksum_is_an_error() {
        let mut input = png(vec![png_chunk(b"IHDR", &[0; 13])]);
        let last = input.len() - 1;
        input[last] ^= 1;
        assert!(matches!(
            strip_metadata(ImageKind::Png, input),
            Err(StripError::Malformed(ImageKind::Png, _))
        ));
    }

    fn webp(chunks: &[(&[u8; 4], &[u8])]) -> Vec<u8> {
        let subchunks = chunks
            .iter()
            .map(|&(id, data)| RiffChunk::new(*id, RiffContent::Data(Bytes::copy_from_slice(data))))
            .collect();
        let riff = RiffChunk::new(
            *b"RIFF",
            RiffContent::List {
                kind: Some(*b"WEBP"),
                subchunks,
            },
        );
        Vec::from(riff.encoder().bytes())
    }

    #[test]
    fn webp_drops_metadata_chunks_and_clears_their_flags() {
        // ICC, alpha, EXIF and XMP announced; a 1×1 canvas.
        let header = |flags: u8| [flags, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let vp8l = b"\x2f\0\0\0\x10\x07\x10\x11\x11\x88\x88\xfe\x07";
        let input = webp(&[
            (b"VP8X", &header(0x20 | 0x10 | 0x08 | 0x04)),
            (b"ICCP", b"profile"),
            (b"VP8L", vp8l),
            (b"EXIF", b"II*\0\x08\0\0\0\0\0\0\0\0\0"),
            (b"XMP ", b"<x:xmpmeta/>"),
            (b"C2PA", b"content credentials"),
        ]);
        let output = strip_metadata(ImageKind::Webp, input).unwrap();
        let expected = webp(&[
            (b"VP8X", &header(0x20 | 0x10)),
            (b"ICCP", b"profile"),
            (b"VP8L", vp8l),
        ]);
        assert_eq!(output, expected);
    }

    #[test]
    fn webp_keeps_the_orientation_and_its_flag() {
        let header = |flags: u8| [flags, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut exif = EXIF_PREFIX.to_vec();
        exif.extend_from_slice(&orientation_only_exif(8));
        exif.extend_from_slice(b"and a maker note");
        let input = webp(&[
            (b"VP8X", &header(0x08 | 0x04)),
            (b"VP8 ", b"data"),
            (b"EXIF", &exif),
            (b"XMP ", b"x"),
        ]);
        let output = strip_metadata(ImageKind::Webp, input).unwrap();
        let expected = webp(&[
            (b"VP8X", &header(0x08)),
            (b"VP8 ", b"data"),
            (b"EXIF", &orientation_only_exif(8)),
        ]);
        assert_eq!(output, expected);
    }

    #[test]
    fn webp_with_an_empty_header_is_an_error() {
        let input = webp(&[(b"VP8X", b""), (b"VP8 ", b"data")]);
        assert!(matches!(
            strip_metadata(ImageKind::Webp, input),
            Err(StripError::Malformed(ImageKind::Webp, _))
        ));
    }

    #[test]
    fn truncated_pngs_and_webps_are_errors() {
        let png = png(vec![
            png_chunk(b"IHDR", &[0; 13]),
            png_chunk(b"IDAT", b"pixels"),
        ]);
        let webp = webp(&[(b"VP8 ", b"data"), (b"EXIF", b"II*\0")]);
        for (kind, input) in [(ImageKind::Png, png), (ImageKind::Webp, webp)] {
            for length in 0..input.len() {
                // A PNG cut exactly between two chunks is a shorter, well-formed PNG.
                let Err(error) = strip_metadata(kind, input[..length].to_vec()) else {
                    assert_eq!(kind, ImageKind::Png, "length {length}");
                    continue;
                };
                assert!(
                    matches!(error, StripError::Malformed(malformed, _) if malformed == kind),
                    "{kind} {length}"
                );
            }
        }
    }

    #[test]
    fn sniff_recognises_the_three_formats_and_nothing_else() {
        let cases: [(&[u8], Option<ImageKind>); 8] = [
            (
                b"\xFF\xD8\xFF\xE0\0\x10JFIF\0\x01\x01\0\0\x01",
                Some(ImageKind::Jpeg),
            ),
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", Some(ImageKind::Png)),
            (b"RIFF\x24\0\0\0WEBPVP8 ", Some(ImageKind::Webp)),
            (b"RIFF\x24\0\0\0WAVEfmt ", None),
            (b"GIF89a\x01\0\x01\0\0\0\0\0\0\0", None),
            (b"\0\0\0\x1cftypheic\0\0\0\0", None),
            (b"RIFF", None),
            (b"", None),
        ];
        for (prefix, kind) in cases {
            assert_eq!(sniff(prefix), kind, "{prefix:?}");
        }
        assert_eq!(ImageKind::Jpeg.mime(), "image/jpeg");
        assert_eq!(ImageKind::Png.mime(), "image/png");
        assert_eq!(ImageKind::Webp.mime(), "image/webp");
    }
}
