//! Which experts a worker hosts: `--shard I/N` (the I-th of N contiguous shards, 0-based) or
//! `--experts 0-3,9` (an explicit list of ids and inclusive ranges).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SelectionError(String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertSelection {
    Shard { index: usize, count: usize },
    List(Vec<u32>),
}

impl ExpertSelection {
    /// Parses `I/N`.
    pub fn parse_shard(text: &str) -> Result<Self, SelectionError> {
        let bad = || SelectionError(format!("--shard `{text}`: expected I/N with 0 ≤ I < N, e.g. 0/4"));
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(ExpertSelection::Shard { index, count })
    }

    /// Parses `0-3,9`.
    pub fn parse_list(text: &str) -> Result<Self, SelectionError> {
        let mut ids = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || SelectionError(format!("--experts: `{part}` is not an id or an a-b range"));
            match part.split_once('-') {
                Some((a, b)) => {
                    let a: u32 = a.trim().parse().map_err(|_| bad())?;
                    let b: u32 = b.trim().parse().map_err(|_| bad())?;
                    if a > b {
                        return Err(bad());
                    }
                    ids.extend(a..=b);
                }
                None => ids.push(part.parse().map_err(|_| bad())?),
            }
        }
        if ids.is_empty() {
            return Err(SelectionError("--experts lists no expert".into()));
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ExpertSelection::List(ids))
    }

    /// The expert ids for a model with `num_experts` experts per layer. Shards split as evenly as
    /// possible, the first `num_experts % N` shards taking one more.
    pub fn resolve(&self, num_experts: usize) -> Result<Vec<u32>, SelectionError> {
        match self {
            ExpertSelection::Shard { index, count } => {
                if *count > num_experts {
                    return Err(SelectionError(format!(
                        "--shard {index}/{count}: the model has only {num_experts} experts per layer"
                    )));
                }
                let base = num_experts / count;
                let extra = num_experts % count;
                let start = index * base + (*index).min(extra);
                let len = base + usize::from(*index < extra);
                Ok((start as u32..(start + len) as u32).collect())
            }
            ExpertSelection::List(ids) => {
                if let Some(bad) = ids.iter().find(|&&e| e as usize >= num_experts) {
                    return Err(SelectionError(format!(
                        "--experts: expert {bad} does not exist (the model has {num_experts} per layer)"
                    )));
                }
                Ok(ids.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_expert_once() {
        for count in 1..=16 {
            let mut all = Vec::new();
            for index in 0..count {
                all.extend(ExpertSelection::Shard { index, count }.resolve(16).expect("resolves"));
            }
            assert_eq!(all, (0..16).collect::<Vec<u32>>(), "N = {count}");
        }
        assert_eq!(ExpertSelection::parse_shard("1/4").expect("ok").resolve(16).expect("ok"), vec![4, 5, 6, 7]);
        assert!(ExpertSelection::parse_shard("4/4").is_err());
        assert!(ExpertSelection::parse_shard("x").is_err());
        assert!(ExpertSelection::Shard { index: 0, count: 17 }.resolve(16).is_err());
    }

    #[test]
    fn lists_and_ranges() {
        let s = ExpertSelection::parse_list("0-3, 9,2").expect("ok");
        assert_eq!(s.resolve(16).expect("ok"), vec![0, 1, 2, 3, 9]);
        assert!(ExpertSelection::parse_list("3-1").is_err());
        assert!(ExpertSelection::parse_list("a").is_err());
        assert!(ExpertSelection::parse_list("16").expect("parses").resolve(16).is_err());
    }
}
