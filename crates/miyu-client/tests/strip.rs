//! `miyu_client::strip` on real images: each is encoded by the `image` crate, tagged by
//! `exiftool` the way cameras and photo apps tag them (GPS position, camera serial number, time
//! taken, XMP, IPTC, comments), stripped, and read back by `exiftool` and by the decoder.
//!
//! Without `exiftool` (Debian's libimage-exiftool-perl) these tests print a note and pass,
//! unless `MIYU_REQUIRE_EXIFTOOL=1` is set, which makes its absence a failure.

use std::io::Cursor;
use std::path::Path;
use std::process::Command;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use miyu_client::strip::{ImageKind, sniff, strip_metadata};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

/// Values planted in the images that must not survive stripping, in any tag.
const SECRETS: &[&str] = &[
    "48.858",
    "2.294",
    "MIYU-SERIAL-4711",
    "2021:07:14",
    "Miyu Test Photographer",
    "Secretville",
    "meet me at the tower",
];

/// Random corruptions tried per format.
const CORRUPTIONS: usize = 2000;

/// The orientation planted: "rotate 90° clockwise", what a phone held upright writes.
const ORIENTATION: u64 = 6;

#[test]
fn jpeg_loses_gps_serial_xmp_iptc_and_comments_but_keeps_pixels_colour_and_orientation() {
    check_real_image(ImageKind::Jpeg);
}

#[test]
fn png_loses_gps_serial_xmp_text_and_time_but_keeps_pixels_colour_and_orientation() {
    check_real_image(ImageKind::Png);
}

#[test]
fn webp_loses_gps_serial_and_xmp_but_keeps_pixels_colour_and_orientation() {
    check_real_image(ImageKind::Webp);
}

#[test]
fn every_prefix_of_a_tagged_image_is_refused_or_clean() {
    if !exiftool_present() {
        return;
    }
    let folder = tempfile::tempdir().unwrap();
    for kind in [ImageKind::Jpeg, ImageKind::Png, ImageKind::Webp] {
        let tagged = tagged_image(kind, folder.path());
        for length in 0..tagged.len() {
            // A JPEG cut inside its image data is still sent (decoders show what there is),
            // and a PNG cut between two chunks is a shorter PNG; what comes out must be clean.
            if let Ok(stripped) = strip_metadata(kind, tagged[..length].to_vec()) {
                assert_no_secret_bytes(&stripped, &format!("{kind} cut to {length} bytes"));
            }
        }
    }
}

#[test]
fn corrupted_images_are_refused_or_stripped_to_a_fixed_point() {
    let folder = tempfile::tempdir().unwrap();
    let tagged = exiftool_runs();
    let mut random = StdRng::seed_from_u64(0x5712);
    for kind in [ImageKind::Jpeg, ImageKind::Png, ImageKind::Webp] {
        let original = if tagged {
            tagged_image(kind, folder.path())
        } else {
            encode(kind)
        };
        for _ in 0..CORRUPTIONS {
            let mut corrupted = original.clone();
            for _ in 0..random.gen_range(1..=4) {
                let at = random.gen_range(0..corrupted.len());
                corrupted[at] = random.r#gen();
            }
            if let Ok(stripped) = strip_metadata(kind, corrupted) {
                assert_eq!(sniff(&stripped), Some(kind));
                let again = strip_metadata(kind, stripped.clone()).unwrap();
                assert!(
                    again == stripped,
                    "{kind}: stripping again changed the image"
                );
            }
        }
    }
}

#[test]
fn sniff_recognises_what_the_image_crate_writes() {
    for kind in [ImageKind::Jpeg, ImageKind::Png, ImageKind::Webp] {
        let bytes = encode(kind);
        assert_eq!(sniff(&bytes[..16]), Some(kind));
        let guessed = image::guess_format(&bytes).unwrap();
        assert_eq!(guessed.to_mime_type(), kind.mime());
    }
}

fn check_real_image(kind: ImageKind) {
    if !exiftool_present() {
        return;
    }
    let folder = tempfile::tempdir().unwrap();
    let tagged = tagged_image(kind, folder.path());

    let before = exiftool_tags(&tagged, folder.path());
    let mut planted = vec![
        "GPS:GPSLatitude",
        "GPS:GPSLongitude",
        "ExifIFD:SerialNumber",
        "ExifIFD:DateTimeOriginal",
        "ExifIFD:UserComment",
        "IFD0:Orientation",
        "XMP-dc:Creator",
        "ICC-header:ProfileClass",
        "ICC_Profile:MediaWhitePoint",
    ];
    planted.extend_from_slice(match kind {
        ImageKind::Jpeg => &["IPTC:City", "File:Comment"][..],
        ImageKind::Png => &["PNG:Comment", "PNG:ModifyDate"],
        ImageKind::Webp => &[],
    });
    for tag in &planted {
        assert!(
            before.contains_key(*tag),
            "{kind}: {tag} was not written: {before:#?}"
        );
    }
    let before_text = Value::Object(before.clone()).to_string();
    // IPTC is only written to the JPEG.
    for secret in SECRETS
        .iter()
        .filter(|secret| kind == ImageKind::Jpeg || **secret != "Secretville")
    {
        assert!(
            before_text.contains(secret),
            "{kind}: {secret} was not written"
        );
    }

    let stripped = strip_metadata(kind, tagged.clone()).unwrap();
    assert_eq!(sniff(&stripped), Some(kind));
    let after = exiftool_tags(&stripped, folder.path());
    for (key, value) in &after {
        let (group, tag) = key.split_once(':').unwrap_or(("", key));
        let forbidden_group = [
            "GPS",
            "ExifIFD",
            "IFD1",
            "InteropIFD",
            "SubIFD",
            "XMP",
            "IPTC",
            "Photoshop",
            "MakerNotes",
        ]
        .iter()
        .any(|family| group.starts_with(family))
            || (group == "IFD0" && tag != "Orientation");
        assert!(!forbidden_group, "{kind}: {key} = {value} survived");
        assert!(!tag.starts_with("GPS"), "{kind}: {key} = {value} survived");
        assert!(!tag.contains("Comment"), "{kind}: {key} = {value} survived");
        assert!(
            !tag.contains("Thumbnail"),
            "{kind}: {key} = {value} survived"
        );
        assert!(
            group != "ExifTool" || tag == "ExifToolVersion",
            "{kind}: exiftool says {key} = {value}"
        );
    }
    let after_text = Value::Object(after.clone()).to_string();
    for secret in SECRETS {
        assert!(
            !after_text.contains(secret),
            "{kind}: {secret} survived: {after:#?}"
        );
    }
    assert_no_secret_bytes(&stripped, &kind.to_string());

    // What is needed to show the picture as it was stays.
    assert_eq!(
        after.get("IFD0:Orientation").and_then(Value::as_u64),
        Some(ORIENTATION),
        "{kind}: {after:#?}"
    );
    for key in [
        "ICC-header:ProfileClass",
        "ICC-header:ColorSpaceData",
        "ICC_Profile:MediaWhitePoint",
    ] {
        assert_eq!(after.get(key), before.get(key), "{kind}: {key}");
    }

    if kind == ImageKind::Webp {
        // The VP8X header announces the ICC profile and the EXIF left for the orientation,
        // no longer XMP.
        let flags = |tags: &Map<String, Value>| tags.get("RIFF:WebP_Flags").and_then(Value::as_u64);
        assert_eq!(flags(&before), Some(0x20 | 0x08 | 0x04));
        assert_eq!(flags(&after), Some(0x20 | 0x08));
    }

    let decoded_before = image::load_from_memory(&tagged).unwrap();
    let decoded_after = image::load_from_memory(&stripped).unwrap();
    assert_eq!(decoded_after.color(), decoded_before.color(), "{kind}");
    assert_eq!(decoded_after.width(), decoded_before.width(), "{kind}");
    assert_eq!(decoded_after.height(), decoded_before.height(), "{kind}");
    assert!(
        decoded_after.as_bytes() == decoded_before.as_bytes(),
        "{kind}: the pixels changed"
    );
    if kind != ImageKind::Jpeg {
        // Lossless formats: the very pixels that were encoded.
        assert!(
            decoded_after.to_rgb8() == picture(),
            "{kind}: the pixels changed"
        );
    }

    assert!(stripped.len() < tagged.len(), "{kind}: nothing was removed");
    let twice = strip_metadata(kind, stripped.clone()).unwrap();
    assert!(
        twice == stripped,
        "{kind}: stripping a stripped image changed it"
    );
}

/// A small picture with a different colour in every pixel, so that any change shows.
fn picture() -> RgbImage {
    RgbImage::from_fn(37, 23, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x * y) % 256) as u8])
    })
}

/// A made-up but well-formed ICC profile (version 2.1, display, RGB, with only a white
/// point), standing in for the colour profile cameras embed, to show that it is kept.
fn icc_profile() -> Vec<u8> {
    let d50 = [0, 0, 0xF6, 0xD6, 0, 1, 0, 0, 0, 0, 0xD3, 0x2D];
    let mut profile = vec![0; 128];
    profile[8..12].copy_from_slice(&[2, 0x10, 0, 0]);
    profile[12..16].copy_from_slice(b"mntr");
    profile[16..20].copy_from_slice(b"RGB ");
    profile[20..24].copy_from_slice(b"XYZ ");
    profile[36..40].copy_from_slice(b"acsp");
    profile[68..80].copy_from_slice(&d50);
    // One tag: the white point, at offset 144, 20 bytes long.
    profile.extend_from_slice(&1u32.to_be_bytes());
    profile.extend_from_slice(b"wtpt");
    profile.extend_from_slice(&144u32.to_be_bytes());
    profile.extend_from_slice(&20u32.to_be_bytes());
    profile.extend_from_slice(b"XYZ \0\0\0\0");
    profile.extend_from_slice(&d50);
    let size = u32::try_from(profile.len()).unwrap().to_be_bytes();
    profile[..4].copy_from_slice(&size);
    profile
}

fn encode(kind: ImageKind) -> Vec<u8> {
    let picture = picture();
    let mut bytes = Vec::new();
    let (width, height) = picture.dimensions();
    match kind {
        ImageKind::Jpeg => {
            let mut encoder = JpegEncoder::new_with_quality(&mut bytes, 90);
            encoder.set_icc_profile(icc_profile()).unwrap();
            encoder
                .write_image(&picture, width, height, ExtendedColorType::Rgb8)
                .unwrap();
        }
        ImageKind::Png => {
            let mut encoder = PngEncoder::new(Cursor::new(&mut bytes));
            encoder.set_icc_profile(icc_profile()).unwrap();
            encoder
                .write_image(&picture, width, height, ExtendedColorType::Rgb8)
                .unwrap();
        }
        ImageKind::Webp => {
            let mut encoder = WebPEncoder::new_lossless(&mut bytes);
            encoder.set_icc_profile(icc_profile()).unwrap();
            encoder
                .write_image(&picture, width, height, ExtendedColorType::Rgb8)
                .unwrap();
        }
    }
    bytes
}

/// The picture, encoded as `kind` and tagged by exiftool.
fn tagged_image(kind: ImageKind, folder: &Path) -> Vec<u8> {
    let extension = match kind {
        ImageKind::Jpeg => "jpg",
        ImageKind::Png => "png",
        ImageKind::Webp => "webp",
    };
    let path = folder.join(format!("photo.{extension}"));
    std::fs::write(&path, encode(kind)).unwrap();
    let mut arguments = vec![
        "-GPSLatitude=48.858370",
        "-GPSLatitudeRef=N",
        "-GPSLongitude=2.294481",
        "-GPSLongitudeRef=E",
        "-EXIF:SerialNumber=MIYU-SERIAL-4711",
        "-EXIF:DateTimeOriginal=2021:07:14 09:26:53",
        "-EXIF:UserComment=meet me at the tower",
        "-EXIF:Orientation#=6",
        "-XMP-dc:Creator=Miyu Test Photographer",
    ];
    arguments.extend_from_slice(match kind {
        ImageKind::Jpeg => &[
            "-IPTC:City=Secretville",
            "-File:Comment=meet me at the tower",
        ][..],
        ImageKind::Png => &[
            "-PNG:Comment=meet me at the tower",
            "-PNG:ModifyDate=2021:07:14 09:26:53",
        ],
        ImageKind::Webp => &[],
    });
    let output = Command::new("exiftool")
        .args(["-q", "-overwrite_original"])
        .args(&arguments)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "exiftool failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(&path).unwrap()
}

/// Every tag exiftool finds, as "Group:Tag" → value, numbers unformatted.
fn exiftool_tags(bytes: &[u8], folder: &Path) -> Map<String, Value> {
    let path = folder.join("read");
    std::fs::write(&path, bytes).unwrap();
    let output = Command::new("exiftool")
        .args(["-j", "-G1", "-a", "-n", "-u"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "exiftool failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let files: Vec<Map<String, Value>> = serde_json::from_slice(&output.stdout).unwrap();
    let mut tags = files.into_iter().next().unwrap();
    // The file's own name, place, size and times say nothing about the image.
    tags.retain(|key, _| !key.starts_with("System:") && key != "SourceFile");
    tags
}

fn assert_no_secret_bytes(bytes: &[u8], what: &str) {
    for secret in SECRETS {
        let found = bytes
            .windows(secret.len())
            .any(|window| window == secret.as_bytes());
        assert!(!found, "{what}: {secret} is still in the bytes");
    }
}

/// Whether exiftool can be run; its absence fails the test when MIYU_REQUIRE_EXIFTOOL=1.
fn exiftool_present() -> bool {
    let present = exiftool_runs();
    if !present {
        let required = std::env::var_os("MIYU_REQUIRE_EXIFTOOL").is_some_and(|value| value == "1");
        assert!(
            !required,
            "MIYU_REQUIRE_EXIFTOOL=1 but exiftool cannot be run (Debian: libimage-exiftool-perl)"
        );
        eprintln!(
            "note: exiftool not found, so the metadata-stripping tests on real images did not run"
        );
    }
    present
}

fn exiftool_runs() -> bool {
    Command::new("exiftool")
        .arg("-ver")
        .output()
        .is_ok_and(|output| output.status.success())
}
