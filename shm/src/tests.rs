//! The rings across wraparound, a full ring, oversized messages, and the corruption and
//! impersonation a segment must refuse.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Nonce, Role, Segment, ShmError};

fn segment(dir: &tempfile::TempDir, ring: usize) -> Arc<Segment> {
    Segment::create(dir.path(), ring).expect("create")
}

fn soon() -> Instant {
    Instant::now() + Duration::from_millis(20)
}

/// Message `i`: a length that wraps the ring at many different offsets, and content that tells
/// where each byte came from.
fn message(i: usize) -> Vec<u8> {
    let len = (i * 389) % 1500;
    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
}

fn poke(seg: &Segment, at: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(seg.path()).expect("open");
    file.write_all_at(bytes, at).expect("write");
}

#[test]
fn messages_survive_wraparound_in_order() {
    let dir = tempfile::tempdir().expect("dir");
    let seg = segment(&dir, 4096);
    let (mut tx, _) = seg.ends(Role::Creator);
    let attached = Segment::attach(dir.path(), seg.name(), seg.nonce()).expect("attach");
    let (_, mut rx) = attached.ends(Role::Attacher);
    let mut buf = Vec::new();
    let mut sent = 0u64;
    for i in 0..300 {
        let m = message(i);
        tx.send(&m, soon()).expect("send");
        sent += m.len() as u64;
        if i % 2 == 1 {
            assert!(rx.recv(&mut buf, Some(soon())).expect("recv"));
            assert_eq!(buf, message(i - 1), "message {}", i - 1);
            assert!(rx.recv(&mut buf, Some(soon())).expect("recv"));
            assert_eq!(buf, message(i), "message {i}");
        }
    }
    assert!(sent > 20 * 4096, "the test must wrap the ring many times ({sent} bytes)");
    assert!(!rx.recv(&mut buf, Some(soon())).expect("empty"), "nothing left");
}

#[test]
fn a_full_ring_waits_for_room_and_an_oversized_message_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let seg = segment(&dir, 4096);
    let (mut tx, _) = seg.ends(Role::Creator);
    let (_, mut rx) = seg.ends(Role::Attacher);
    let big = vec![7u8; 1000]; // 1008 bytes a record: four fit
    for _ in 0..4 {
        tx.send(&big, soon()).expect("fits");
    }
    let started = Instant::now();
    assert!(matches!(tx.send(&big, soon()), Err(ShmError::Full)), "a fifth does not fit");
    assert!(started.elapsed() < Duration::from_secs(1));
    let mut buf = Vec::new();
    assert!(rx.recv(&mut buf, None).expect("recv"));
    tx.send(&big, soon()).expect("room again after one was read");

    let too_large = vec![0u8; 4096 - 8 + 1];
    let e = tx.send(&too_large, soon()).expect_err("larger than the ring");
    assert!(matches!(e, ShmError::TooLarge { len: 4089, max: 4088 }), "{e}");
    assert!(!e.retryable());
    for _ in 0..4 {
        assert!(rx.recv(&mut buf, None).expect("drain"));
    }
    tx.send(&too_large[..4088], soon()).expect("the largest message fits an empty ring");
    assert!(rx.recv(&mut buf, None).expect("recv"));
    assert_eq!(buf.len(), 4088);
}

/// Two threads, a ring small enough to fill: every message arrives once, in order, with both
/// sides sleeping on futexes in between.
#[test]
fn producer_and_consumer_threads_hand_over_every_message() {
    let dir = tempfile::tempdir().expect("dir");
    let seg = segment(&dir, 8192);
    let (mut tx, _) = seg.ends(Role::Creator);
    let (_, mut rx) = seg.ends(Role::Attacher);
    const N: usize = 5000;
    let producer = std::thread::spawn(move || {
        for i in 0..N {
            if i % 1000 == 0 {
                std::thread::sleep(Duration::from_millis(5)); // let the consumer fall asleep
            }
            tx.send(&message(i), Instant::now() + Duration::from_secs(10)).expect("send");
        }
    });
    let mut buf = Vec::new();
    for i in 0..N {
        assert!(rx.recv(&mut buf, Some(Instant::now() + Duration::from_secs(10))).expect("recv"), "message {i}");
        assert_eq!(buf, message(i), "message {i}");
    }
    producer.join().expect("producer");
}

#[test]
fn closing_wakes_a_sleeping_consumer_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    let seg = segment(&dir, 4096);
    let (_, mut rx) = seg.ends(Role::Attacher);
    let closer = seg.clone();
    let started = Instant::now();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        closer.close();
    });
    let mut buf = Vec::new();
    assert!(matches!(rx.recv(&mut buf, None), Err(ShmError::Closed)));
    assert!(started.elapsed() < Duration::from_millis(100) + Duration::from_millis(500), "{:?}", started.elapsed());
    let (mut tx, _) = seg.ends(Role::Creator);
    assert!(matches!(tx.send(b"late", soon()), Err(ShmError::Closed)));
}

#[test]
fn corrupt_positions_and_records_are_errors() {
    let dir = tempfile::tempdir().expect("dir");
    let seg = segment(&dir, 4096);
    let (mut tx, _) = seg.ends(Role::Creator);
    let (_, mut rx) = seg.ends(Role::Attacher);
    let mut buf = Vec::new();
    // A record tag overwritten after publication.
    tx.send(b"hello", soon()).expect("send");
    poke(&seg, 4096 + 4, &[0xff; 4]);
    let e = rx.recv(&mut buf, Some(soon())).expect_err("bad tag");
    assert!(matches!(e, ShmError::Corrupt(_)), "{e}");
    // A record length past what was published.
    let seg = segment(&dir, 4096);
    let (mut tx, _) = seg.ends(Role::Creator);
    let (_, mut rx) = seg.ends(Role::Attacher);
    tx.send(b"hello", soon()).expect("send");
    poke(&seg, 4096, &4000u32.to_le_bytes());
    assert!(matches!(rx.recv(&mut buf, Some(soon())), Err(ShmError::Corrupt(_))));
    // A producer position more than a ring ahead, and one that is not a record boundary.
    for tail in [1u64 << 40, 12] {
        let seg = segment(&dir, 4096);
        let (_, mut rx) = seg.ends(Role::Attacher);
        poke(&seg, 256, &tail.to_le_bytes());
        assert!(matches!(rx.recv(&mut buf, Some(soon())), Err(ShmError::Corrupt(_))), "tail {tail}");
    }
    // A consumer position ahead of the producer.
    let seg = segment(&dir, 4096);
    let (mut tx, _) = seg.ends(Role::Creator);
    poke(&seg, 256 + 128, &4096u64.to_le_bytes());
    assert!(matches!(tx.send(b"x", soon()), Err(ShmError::Corrupt(_))));
}

#[test]
fn only_the_right_file_with_the_right_nonce_attaches() {
    let dir = tempfile::tempdir().expect("dir");
    let seg = segment(&dir, 4096);
    let meta = std::fs::metadata(seg.path()).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "created owner-only");
    assert_eq!(meta.len(), 4096 + 2 * 4096);

    let wrong = Nonce::from_hex(&"00".repeat(16)).expect("hex");
    let e = Segment::attach(dir.path(), seg.name(), &wrong).expect_err("wrong nonce");
    assert!(e.to_string().contains("nonce"), "{e}");
    for name in ["../etc/passwd", "epserve-shm-xyz", "other"] {
        let e = Segment::attach(dir.path(), name, seg.nonce()).expect_err("bad name");
        assert!(matches!(e, ShmError::Refused { .. }), "{name}: {e}");
    }
    let missing = format!("epserve-shm-{}", "ab".repeat(16));
    assert!(matches!(Segment::attach(dir.path(), &missing, seg.nonce()), Err(ShmError::Io { .. })));

    std::fs::set_permissions(seg.path(), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = Segment::attach(dir.path(), seg.name(), seg.nonce()).expect_err("readable by others");
    assert!(e.to_string().contains("mode 644"), "{e}");
    std::fs::set_permissions(seg.path(), std::fs::Permissions::from_mode(0o600)).expect("chmod");

    poke(&seg, 32, &8192u64.to_le_bytes());
    let e = Segment::attach(dir.path(), seg.name(), seg.nonce()).expect_err("ring size");
    assert!(e.to_string().contains("ring size"), "{e}");
    poke(&seg, 0, b"garbage!");
    let e = Segment::attach(dir.path(), seg.name(), seg.nonce()).expect_err("magic");
    assert!(e.to_string().contains("magic"), "{e}");

    let good = segment(&dir, 4096);
    Segment::attach(dir.path(), good.name(), good.nonce()).expect("the right nonce attaches");
    good.unlink().expect("unlink");
    assert!(!good.path().exists(), "unlinked");
    let dropped = segment(&dir, 4096);
    let path = dropped.path().to_path_buf();
    drop(dropped);
    assert!(!path.exists(), "the creator's file goes with it");
    assert!(matches!(Segment::create(dir.path(), 1000), Err(ShmError::RingSize(1000))));
}
