//! Round trips, rotation, and every way a file can be cut short or damaged.

use super::*;

fn header(experts: u32, top_k: u32) -> TraceHeader {
    TraceHeader {
        model: "mini".into(),
        config_hash: config_hash(b"{}"),
        layers: vec![0, 2, 5],
        num_experts: experts,
        top_k,
        expert_bytes: 3 << 20,
        start_unix_ms: 1,
        part: 0,
    }
}

fn steps(h: &TraceHeader, n: usize) -> Vec<Vec<Vec<Vec<u32>>>> {
    // steps[s][layer][token] = top-k choices
    (0..n)
        .map(|s| {
            h.layers
                .iter()
                .map(|&l| {
                    (0..(s % 7 + 1))
                        .map(|t| {
                            (0..h.top_k).map(|j| (s as u32 * 31 + t as u32 * 7 + l * 3 + j) % h.num_experts).collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

fn write(path: &std::path::Path, h: &TraceHeader, data: &[Vec<Vec<Vec<u32>>>], options: WriterOptions) -> WriterStats {
    let w = TraceWriter::create(path, h.clone(), options).expect("create");
    let mut b = StepBuilder::new(w.header());
    for step in data {
        for (&l, rows) in h.layers.iter().zip(step) {
            // In two batches, as micro-batch overlap sends a layer.
            let mid = rows.len() / 2;
            b.record(l as usize, &rows[..mid]);
            b.record(l as usize, &rows[mid..]);
        }
        while !w.submit(b.clone().finish()) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        b.finish();
    }
    w.finish().expect("finish")
}

fn read_all(path: &std::path::Path) -> Result<(TraceHeader, Vec<Record>), TraceError> {
    let mut r = TraceReader::open(path)?;
    let mut out = Vec::new();
    while let Some(rec) = r.next_record()? {
        out.push(rec);
    }
    Ok((r.header().clone(), out))
}

#[test]
fn round_trip_one_and_two_byte_ids() {
    for (experts, k) in [(16, 1), (16, 2), (300, 3)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.eprt");
        let h = header(experts, k);
        let data = steps(&h, 50);
        let stats = write(&path, &h, &data, WriterOptions::default());
        assert_eq!((stats.steps, stats.dropped_steps, stats.parts), (50, 0, 1));
        let (read_h, records) = read_all(&path).expect("read");
        assert_eq!(read_h, h);
        assert_eq!(records.len(), 50);
        for (rec, step) in records.iter().zip(&data) {
            let Record::Step(s) = rec else { panic!("not a step: {rec:?}") };
            assert_eq!(s.tokens as usize, step[0].len());
            for (ids, rows) in s.layers.iter().zip(step) {
                let want: Vec<u16> = rows.iter().flatten().map(|&e| e as u16).collect();
                assert_eq!(ids, &want);
            }
            let loads = s.loads(&h);
            assert_eq!(loads.counts[0].iter().sum::<u32>() as usize, step[0].len() * k as usize);
        }
    }
}

#[test]
fn rotation_splits_into_readable_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.eprt");
    let h = header(16, 1);
    let data = steps(&h, 200);
    let stats = write(&path, &h, &data, WriterOptions { buffer_steps: 8, part_bytes: 1024 });
    assert!(stats.parts > 2, "{stats:?}");
    assert!(part_path(&path, 1).exists());
    let (_, records) = read_all(&path).expect("read");
    let steps = records.iter().filter(|r| matches!(r, Record::Step(_))).count() as u64;
    assert_eq!(steps, stats.steps);
    assert_eq!(steps + stats.dropped_steps, 200 + stats.dropped_steps);
    // A part alone is a trace too.
    let (h1, _) = read_all(&part_path(&path, stats.parts - 1)).expect("last part");
    assert_eq!(h1.part, stats.parts - 1);
    // Recording again over it removes the old parts.
    write(&path, &h, &data[..3], WriterOptions::default());
    assert!(!part_path(&path, 1).exists());
}

#[test]
fn a_full_buffer_drops_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.eprt");
    let h = header(16, 1);
    let w =
        TraceWriter::create(&path, h.clone(), WriterOptions { buffer_steps: 1, part_bytes: 1 << 30 }).expect("create");
    let mut b = StepBuilder::new(&h);
    let mut accepted = 0u64;
    for _ in 0..5000 {
        b.record(0, &[vec![1], vec![2]]);
        accepted += u64::from(w.submit(b.finish()));
    }
    let stats = w.finish().expect("finish");
    assert_eq!(stats.steps, accepted);
    assert_eq!(stats.steps + stats.dropped_steps, 5000);
    assert!(stats.dropped_steps > 0);
    let (_, records) = read_all(&path).expect("read");
    let dropped: u64 = records.iter().map(|r| if let Record::Dropped { steps, .. } = r { *steps } else { 0 }).sum();
    assert_eq!(dropped, stats.dropped_steps);
}

#[test]
fn truncated_files_name_the_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.eprt");
    let h = header(16, 1);
    write(&path, &h, &steps(&h, 3), WriterOptions::default());
    let full = std::fs::read(&path).expect("read");
    let header_end = 14 + u32::from_le_bytes([full[10], full[11], full[12], full[13]]) as usize;
    let first_len =
        u32::from_le_bytes([full[header_end + 1], full[header_end + 2], full[header_end + 3], full[header_end + 4]]);
    let second = header_end + 5 + first_len as usize;
    let cut = dir.path().join("cut.eprt");
    for (len, offset) in [
        (4, 0),
        (10, 8),
        (20, 14),
        (header_end + 3, header_end),
        (second + 7, second),
        (
            full.len() - 1,
            second + 5 + {
                u32::from_le_bytes([full[second + 1], full[second + 2], full[second + 3], full[second + 4]]) as usize
            },
        ),
    ] {
        std::fs::write(&cut, &full[..len]).expect("write");
        match read_all(&cut) {
            Err(TraceError::Truncated { offset: o, .. }) => assert_eq!(o as usize, offset, "cut at {len}"),
            other => panic!("cut at {len}: {other:?}"),
        }
        let message = read_all(&cut).expect_err("truncated").to_string();
        assert!(message.contains(&format!("byte {offset}")), "{message}");
    }
    // At a record boundary the file is whole.
    std::fs::write(&cut, &full[..second]).expect("write");
    assert_eq!(read_all(&cut).expect("read").1.len(), 1);
}

#[test]
fn damage_is_an_error_at_its_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.eprt");
    let h = header(16, 1);
    write(&path, &h, &steps(&h, 2), WriterOptions::default());
    let full = std::fs::read(&path).expect("read");
    let header_end = 14 + u32::from_le_bytes([full[10], full[11], full[12], full[13]]) as usize;
    let bad = dir.path().join("bad.eprt");
    let mut kind = full.clone();
    kind[header_end] = 9;
    std::fs::write(&bad, &kind).expect("write");
    assert!(matches!(read_all(&bad), Err(TraceError::Corrupt { offset, .. }) if offset as usize == header_end));
    let mut id = full.clone();
    // First expert id of the first step's first layer: kind, len, timestamp, tokens, n.
    id[header_end + 5 + 12 + 4] = 200;
    std::fs::write(&bad, &id).expect("write");
    assert!(matches!(read_all(&bad), Err(TraceError::Corrupt { .. })));
    let mut version = full.clone();
    version[8] = 7;
    std::fs::write(&bad, &version).expect("write");
    assert!(matches!(read_all(&bad), Err(TraceError::Version { found: 7, .. })));
    std::fs::write(&bad, b"hello world, not a trace").expect("write");
    assert!(matches!(read_all(&bad), Err(TraceError::NotATrace { .. })));
}
