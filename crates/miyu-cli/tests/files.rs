//! End-to-end tests of encrypted files: real `miyu-server` and `miyu` processes on 127.0.0.1,
//! large files, interrupted transfers, a damaged server copy, strangers, and image metadata.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use common::{
    Server, connect_pair, count_in_files, miyu, miyu_command, miyu_ok, register, runtime,
};
use sha2::{Digest, Sha256};

/// Writes `len` bytes of varied content (xorshift), with `marker` every 16 MiB.
fn write_file(path: &Path, len: usize, marker: &[u8]) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < len {
        for word in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        if written % (16 << 20) == 0 {
            block[100..100 + marker.len()].copy_from_slice(marker);
        }
        let take = block.len().min(len - written);
        file.write_all(&block[..take]).unwrap();
        written += take;
    }
    file.flush().unwrap();
}

fn sha256_of(path: &Path) -> [u8; 32] {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).unwrap();
        if read == 0 {
            return hasher.finalize().into();
        }
        hasher.update(&buffer[..read]);
    }
}

fn json(profile: &Path, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    serde_json::from_str(&miyu_ok(profile, &full)).unwrap()
}

/// The id of the file called `name` in `profile`'s conversation with `contact`, after a sync.
fn file_id(profile: &Path, contact: &str, name: &str) -> i64 {
    miyu_ok(profile, &["sync"]);
    let files = json(profile, &["files", contact]);
    files
        .as_array()
        .unwrap()
        .iter()
        .find(|file| file["name"] == name)
        .unwrap_or_else(|| panic!("no file {name} in {files}"))["id"]
        .as_i64()
        .unwrap()
}

/// The blob files the server keeps.
fn blob_files(server: &Server) -> Vec<PathBuf> {
    let folder = server.data.join("blobs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Starts a `miyu` command whose stderr the test reads.
fn spawn_miyu(profile: &Path, args: &[&str]) -> Child {
    miyu_command()
        .arg("--profile")
        .arg(profile)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Kills `child` as soon as its progress lines report at least `percent`.
fn kill_at(mut child: Child, verb: &str, percent: u64) {
    let stderr = child.stderr.take().unwrap();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let reached = line
            .strip_prefix(verb)
            .and_then(|rest| rest.trim().split('%').next())
            .and_then(|number| number.parse::<u64>().ok())
            .is_some_and(|at| at >= percent);
        if reached {
            assert!(
                at_most(&line, 90),
                "killed too late to test resuming: {line}"
            );
            child.kill().unwrap();
            child.wait().unwrap();
            return;
        }
    }
    panic!("{verb} never reached {percent}%: {:?}", child.wait());
}

fn at_most(line: &str, percent: u64) -> bool {
    line.split_whitespace()
        .nth(1)
        .and_then(|p| p.trim_end_matches('%').parse::<u64>().ok())
        .is_some_and(|at| at <= percent)
}

#[test]
fn a_200_mb_file_round_trips_with_its_hash_and_the_server_sees_only_ciphertext() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let marker = b"PLAINTEXT-MARKER-7c1d";
    let name = "quarterly-plan-NAMEMARKER.bin";
    let original = root.path().join(name);
    write_file(&original, 200 << 20, marker);

    let sent = json(
        &pair.alice,
        &["send-file", "bob", original.to_str().unwrap()],
    );
    assert_eq!(sent["size"], 200 << 20);
    assert_eq!(sent["metadata_stripped"], false);
    let id = file_id(&pair.bob, "alice", name);
    let listed = json(&pair.bob, &["files", "alice"]);
    assert_eq!(listed[0]["size"], 200 << 20);
    assert_eq!(listed[0]["sender"], "alice");
    let messages = miyu_ok(&pair.bob, &["messages", "alice"]);
    assert!(messages.contains(name), "{messages}");

    let out = root.path().join("received.bin");
    miyu_ok(
        &pair.bob,
        &[
            "download",
            "alice",
            &id.to_string(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(sha256_of(&out), sha256_of(&original));

    // The server holds one blob: the ciphertext padded to a Padmé length (a multiple of 4 MiB
    // at this size), and none of its files (database, blobs, log) contains the file's bytes or
    // its name.
    let blobs = blob_files(&server);
    assert_eq!(blobs.len(), 1);
    let blob_len = std::fs::metadata(&blobs[0]).unwrap().len();
    let layout =
        miyu_crypto::file::Layout::new(200 << 20, miyu_crypto::file::DEFAULT_CHUNK).unwrap();
    assert_eq!(blob_len, layout.padded_len());
    assert_eq!(blob_len % (4 << 20), 0);
    assert!(blob_len > layout.ciphertext_len());
    assert!(count_in_files(std::slice::from_ref(&original), marker) > 0);
    for needle in [&marker[..], b"NAMEMARKER", b"quarterly-plan"] {
        assert_eq!(
            count_in_files(&server.files(), needle),
            0,
            "{} found on the server",
            String::from_utf8_lossy(needle)
        );
    }
}

#[test]
fn killed_uploads_and_downloads_resume_where_they_stopped() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let original = root.path().join("big.bin");
    write_file(&original, 160 << 20, b"resume");

    let uploader = spawn_miyu(
        &pair.alice,
        &["send-file", "bob", original.to_str().unwrap()],
    );
    kill_at(uploader, "sent", 30);
    let output = miyu(
        &pair.alice,
        &["send-file", "bob", original.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming:"),
        "the upload started over: {stderr}"
    );
    // One blob: the second run continued the first one's.
    assert_eq!(blob_files(&server).len(), 1);

    let id = file_id(&pair.bob, "alice", "big.bin").to_string();
    let out = root.path().join("down.bin");
    let args = ["download", "alice", &id, "--out", out.to_str().unwrap()];
    let downloader = spawn_miyu(&pair.bob, &args);
    kill_at(downloader, "downloaded", 30);
    assert!(!out.exists());
    let output = miyu(&pair.bob, &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming:"),
        "the download started over: {stderr}"
    );
    assert_eq!(sha256_of(&out), sha256_of(&original));
}

#[test]
fn a_damaged_or_truncated_server_copy_is_refused_with_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let original = root.path().join("doc.bin");
    write_file(&original, 3 << 20, b"damage");
    miyu_ok(
        &pair.alice,
        &["send-file", "bob", original.to_str().unwrap()],
    );
    let id = file_id(&pair.bob, "alice", "doc.bin").to_string();
    let blob = blob_files(&server).remove(0);
    let pristine = std::fs::read(&blob).unwrap();

    // One flipped bit in the middle of the stored ciphertext.
    let mut flipped = pristine.clone();
    flipped[pristine.len() / 2] ^= 0x01;
    std::fs::write(&blob, &flipped).unwrap();
    let out = root.path().join("out.bin");
    let args = ["download", "alice", &id, "--out", out.to_str().unwrap()];
    let output = miyu(&pair.bob, &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("was altered on the server"), "{stderr}");
    assert!(!out.exists());

    // The last chunks cut off.
    std::fs::write(&blob, &pristine[..pristine.len() - 70_000]).unwrap();
    let output = miyu(&pair.bob, &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("truncated"), "{stderr}");
    assert!(!out.exists());

    // Restored, the same command finishes the download and the file checks out.
    std::fs::write(&blob, &pristine).unwrap();
    miyu_ok(&pair.bob, &args);
    assert_eq!(sha256_of(&out), sha256_of(&original));
}

#[test]
fn strangers_unsigned_and_replayed_requests_cannot_download() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let original = root.path().join("private.bin");
    write_file(&original, 100_000, b"private");
    miyu_ok(
        &pair.alice,
        &["send-file", "bob", original.to_str().unwrap()],
    );
    let blob = blob_files(&server).remove(0);
    let path = format!("/v1/blobs/{}", blob.file_name().unwrap().to_str().unwrap());
    let address: miyu_proto::ServerAddress = server.address.parse().unwrap();

    runtime().block_on(async {
        let (_connection, stranger) = register(&address).await;
        let mut http = miyu_client::files::BlobClient::new(&stranger, &address, None);
        // No signature, or a malformed one: refused before anything is looked up.
        assert_eq!(http.status_of("GET", &path, None).await.unwrap(), 401);
        assert_eq!(
            http.status_of("GET", &path, Some("Miyu x.1.y.z"))
                .await
                .unwrap(),
            401
        );
        // Signed by a registered device that is not in the conversation.
        let signed = http.authorization("GET", &path);
        assert_eq!(
            http.status_of("GET", &path, Some(&signed)).await.unwrap(),
            403
        );
        assert_eq!(
            http.status_of("HEAD", &path, Some(&http.authorization("HEAD", &path)))
                .await
                .unwrap(),
            403
        );
        // The same signed request again is a replay.
        assert_eq!(
            http.status_of("GET", &path, Some(&signed)).await.unwrap(),
            401
        );
        // A signature for another path or method does not carry over.
        let other = http.authorization("GET", "/v1/blobs/elsewhere");
        assert_eq!(
            http.status_of("GET", &path, Some(&other)).await.unwrap(),
            401
        );
        // Uploading into someone else's blob.
        let patch = http.authorization("PATCH", &path);
        assert_eq!(
            http.status_of("PATCH", &path, Some(&patch)).await.unwrap(),
            403
        );
    });
    // Bob, a member, still gets it.
    let id = file_id(&pair.bob, "alice", "private.bin").to_string();
    let out = root.path().join("got.bin");
    miyu_ok(
        &pair.bob,
        &["download", "alice", &id, "--out", out.to_str().unwrap()],
    );
    assert_eq!(sha256_of(&out), sha256_of(&original));
}

#[test]
fn deleting_an_account_removes_its_blob_files() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let original = root.path().join("gone.bin");
    write_file(&original, 200_000, b"gone");
    miyu_ok(
        &pair.alice,
        &["send-file", "bob", original.to_str().unwrap()],
    );
    let blob = blob_files(&server).remove(0);
    miyu_ok(&pair.alice, &["account", "delete", "--yes"]);
    // The server answers the deletion once the account's blob files are gone too.
    assert!(!blob.exists(), "the blob file outlived its account");
    let id = file_id(&pair.bob, "alice", "gone.bin").to_string();
    // Into the current folder, which is the test's own: nothing may be left there.
    let folder = root.path().join("downloads");
    std::fs::create_dir(&folder).unwrap();
    let output = miyu_command()
        .current_dir(&folder)
        .arg("--profile")
        .arg(&pair.bob)
        .args(["download", "alice", &id])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no longer on the server"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        std::fs::read_dir(&folder).unwrap().count(),
        0,
        "a failed download left a file behind"
    );
}

/// Whether exiftool can be run; its absence fails the test when MIYU_REQUIRE_EXIFTOOL=1.
fn exiftool_present() -> bool {
    let present = std::process::Command::new("exiftool")
        .arg("-ver")
        .output()
        .is_ok_and(|output| output.status.success());
    if !present {
        assert!(
            std::env::var_os("MIYU_REQUIRE_EXIFTOOL").is_none_or(|value| value != "1"),
            "MIYU_REQUIRE_EXIFTOOL=1 but exiftool cannot be run (Debian: libimage-exiftool-perl)"
        );
        eprintln!("note: exiftool not found, so the photo test did not run");
    }
    present
}

/// What exiftool reads in a file, tag by tag (group:name), without the file system's own.
fn exif_tags(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let output = std::process::Command::new("exiftool")
        .args(["-j", "-G1", "-a", "-n"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let files: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(&output.stdout).unwrap();
    files.into_iter().next().unwrap()
}

fn has_tag(tags: &serde_json::Map<String, serde_json::Value>, group: &str) -> bool {
    tags.keys().any(|key| key.starts_with(group))
}

#[test]
fn a_photo_arrives_without_its_gps_position_and_serial_unless_asked() {
    if !exiftool_present() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);

    // A real JPEG, tagged the way a phone tags it.
    let picture = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
    });
    let photo = root.path().join("holiday.jpg");
    picture.save(&photo).unwrap();
    let tagged = std::process::Command::new("exiftool")
        .args([
            "-overwrite_original",
            "-GPSLatitude=48.8583",
            "-GPSLatitudeRef=N",
            "-GPSLongitude=2.2945",
            "-GPSLongitudeRef=E",
            "-SerialNumber=MIYU-SERIAL-4711",
            "-DateTimeOriginal=2021:07:14 10:00:00",
            "-XMP-dc:Creator=Miyu Test Photographer",
            "-IPTC:City=Secretville",
        ])
        .arg(&photo)
        .output()
        .unwrap();
    assert!(tagged.status.success());
    let before = exif_tags(&photo);
    for group in ["GPS:", "XMP-dc:", "IPTC:"] {
        assert!(
            has_tag(&before, group),
            "the test photo lacks {group}: {before:?}"
        );
    }
    let kept = root.path().join("holiday-kept.jpg");
    std::fs::copy(&photo, &kept).unwrap();

    let sent = json(&pair.alice, &["send-file", "bob", photo.to_str().unwrap()]);
    assert_eq!(sent["metadata_stripped"], true);
    json(
        &pair.alice,
        &[
            "send-file",
            "bob",
            kept.to_str().unwrap(),
            "--keep-metadata",
        ],
    );
    let stripped_id = file_id(&pair.bob, "alice", "holiday.jpg").to_string();
    let kept_id = file_id(&pair.bob, "alice", "holiday-kept.jpg").to_string();
    let received = root.path().join("received.jpg");
    let received_kept = root.path().join("received-kept.jpg");
    miyu_ok(
        &pair.bob,
        &[
            "download",
            "alice",
            &stripped_id,
            "--out",
            received.to_str().unwrap(),
        ],
    );
    miyu_ok(
        &pair.bob,
        &[
            "download",
            "alice",
            &kept_id,
            "--out",
            received_kept.to_str().unwrap(),
        ],
    );

    let after = exif_tags(&received);
    for group in ["GPS:", "XMP", "IPTC:", "ExifIFD:", "Photoshop:"] {
        assert!(!has_tag(&after, group), "{group} survived: {after:?}");
    }
    let bytes = std::fs::read(&received).unwrap();
    for secret in [
        "MIYU-SERIAL-4711",
        "Secretville",
        "Miyu Test Photographer",
        "2021:07:14",
    ] {
        assert_eq!(
            count_in_files(std::slice::from_ref(&received), secret.as_bytes()),
            0,
            "{secret}"
        );
    }
    // Not re-encoded: the same pixels, decoded.
    let original_pixels = image::open(&photo).unwrap().to_rgb8();
    let received_pixels = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(original_pixels, received_pixels);
    // Asked to keep it, the metadata goes along unchanged.
    assert_eq!(
        std::fs::read(&received_kept).unwrap(),
        std::fs::read(&kept).unwrap()
    );
    assert!(has_tag(&exif_tags(&received_kept), "GPS:"));
}

#[test]
fn the_server_enforces_its_size_limit_and_each_accounts_quota() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(
        &root.path().join("server"),
        "127.0.0.1:0",
        &["--blob-max-mb", "2", "--blob-quota-mb", "2"],
    );
    let pair = connect_pair(root.path(), &server.address);
    let big = root.path().join("big.bin");
    write_file(&big, 2 << 20, b"big");
    let small = root.path().join("small.bin");
    write_file(&small, 1_500_000, b"small");

    // 2 MiB of file is a little more than 2 MiB of ciphertext.
    let output = miyu(&pair.alice, &["send-file", "bob", big.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("at most 2097152 bytes"), "{stderr}");

    miyu_ok(&pair.alice, &["send-file", "bob", small.to_str().unwrap()]);
    let output = miyu(&pair.alice, &["send-file", "bob", small.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("quota"), "{stderr}");
    // Nothing of the refused uploads is stored, and the other account's quota is its own.
    assert_eq!(blob_files(&server).len(), 1);
    miyu_ok(&pair.bob, &["send-file", "alice", small.to_str().unwrap()]);
}

#[test]
fn a_download_never_writes_through_a_planted_link_or_over_an_existing_file() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server"), "127.0.0.1:0", &[]);
    let pair = connect_pair(root.path(), &server.address);
    let original = root.path().join("report.bin");
    write_file(&original, 300_000, b"report");
    miyu_ok(
        &pair.alice,
        &["send-file", "bob", original.to_str().unwrap()],
    );
    let id = file_id(&pair.bob, "alice", "report.bin").to_string();

    // Someone sharing the folder plants a link where the partial download would go.
    let victim = root.path().join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let folder = root.path().join("shared");
    std::fs::create_dir(&folder).unwrap();
    let out = folder.join("report.bin");
    std::os::unix::fs::symlink(&victim, folder.join(format!(".report.bin.{id}.miyu-part")))
        .unwrap();
    let args = ["download", "alice", &id, "--out", out.to_str().unwrap()];
    let output = miyu(&pair.bob, &args);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert!(!out.exists());

    // An existing file is never replaced.
    std::fs::write(&out, "mine").unwrap();
    let output = miyu(&pair.bob, &args);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "mine");

    // Without the link, the download goes through.
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(folder.join(format!(".report.bin.{id}.miyu-part"))).unwrap();
    miyu_ok(&pair.bob, &args);
    assert_eq!(sha256_of(&out), sha256_of(&original));
    assert_eq!(
        std::fs::read_dir(&folder).unwrap().count(),
        1,
        "no partial file left"
    );
}
