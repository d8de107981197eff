//! How the tokens routed to a replicated expert are split across its hosts. The coordinator splits
//! by this function and the replay models by it, so that a replay's prediction is what a cluster
//! measures.

/// The rows that host `i` of `hosts` receives when `rows` rows go to an expert with `hosts` hosts
/// (in the placement's host order): as even as integers allow, `⌊rows·(i+1)/hosts⌋ − ⌊rows·i/hosts⌋`,
/// so the remainder is spread over the hosts rather than all given to the first. Zero hosts get
/// nothing (the caller must treat an unplaced expert as an error).
pub fn split_rows(rows: u32, hosts: usize) -> impl Iterator<Item = u32> {
    let (rows, n) = (u64::from(rows), hosts as u64);
    (0..n).map(move |i| ((rows * (i + 1)) / n - (rows * i) / n) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_even_and_sum_to_the_rows() {
        for rows in 0..40u32 {
            for hosts in 1..7usize {
                let parts: Vec<u32> = split_rows(rows, hosts).collect();
                assert_eq!(parts.len(), hosts);
                assert_eq!(parts.iter().sum::<u32>(), rows);
                let (lo, hi) = (parts.iter().min().copied(), parts.iter().max().copied());
                assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{rows} over {hosts}: {parts:?}");
            }
        }
        assert_eq!(split_rows(5, 0).count(), 0);
    }
}
