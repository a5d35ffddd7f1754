//! What a Slurm step already tells every task, so a world under `srun` needs
//! no `MASTER_ADDR`/`MASTER_PORT`: the step's node list (rank 0 runs on its
//! first host) and the job and step ids (a port that concurrent jobs on one
//! node do not share).
//!
//! Slurm's hostlist syntax, as `SLURM_STEP_NODELIST` spells it: a comma list
//! of host patterns; a pattern is text with any number of bracket groups,
//! each a comma list of numbers or `lo-hi` ranges, whose zero padding is the
//! width of `lo` as written. `gpu[01-04,07],cpu3` is gpu01..gpu04, gpu07,
//! cpu3; `r[1-2]n[1-2]` is r1n1, r1n2, r2n1, r2n2.

/// The lowest port a Slurm step's rendezvous is given (see [`step_port`]).
pub(crate) const SLURM_PORT_BASE: u16 = 15000;
/// How many ports, from [`SLURM_PORT_BASE`] up, Slurm steps are spread over.
pub(crate) const SLURM_PORT_SPAN: u16 = 10000;

/// The rendezvous port of one Slurm step:
/// `15000 + (job_id * 10 + step_id) mod 10000`. Steps of one job, and jobs
/// whose ids are less than 1000 apart, get different ports. The range lies
/// below the kernel's ephemeral ports (32768 and up), where the ranks' own
/// listeners get theirs.
pub(crate) fn step_port(job_id: u64, step_id: u64) -> u16 {
    let offset = (job_id % 1000) * 10 + step_id % 10;
    SLURM_PORT_BASE + (offset % SLURM_PORT_SPAN as u64) as u16
}

/// One bracket group: its numbers as ranges, each with the width it is
/// zero-padded to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ranges(Vec<(u64, u64, usize)>);

/// A piece of one host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Group(Ranges),
}

/// A parsed hostlist: every pattern checked, nothing expanded, so a huge
/// range costs nothing until its hosts are asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hostlist {
    patterns: Vec<Vec<Piece>>,
}

impl Hostlist {
    /// Parses Slurm's hostlist syntax; the error says what is wrong and where.
    pub(crate) fn parse(list: &str) -> Result<Hostlist, String> {
        let list = list.trim();
        if list.is_empty() {
            return Err("is empty".into());
        }
        let patterns = split_top_level(list)?
            .into_iter()
            .map(parse_pattern)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Hostlist { patterns })
    }

    /// The first host, as Slurm orders them (rank 0's host under `srun`).
    pub(crate) fn first(&self) -> String {
        let mut host = String::new();
        for piece in &self.patterns[0] {
            match piece {
                Piece::Text(text) => host.push_str(text),
                Piece::Group(Ranges(ranges)) => {
                    let (lo, _, width) = ranges[0];
                    host.push_str(&format!("{lo:0width$}"));
                }
            }
        }
        host
    }

    /// Every host in order, or an error when there are more than `limit`
    /// (the tests' view of what a list names).
    #[cfg(test)]
    fn expand(&self, limit: usize) -> Result<Vec<String>, String> {
        let mut hosts = Vec::new();
        for pattern in &self.patterns {
            let mut partial = vec![String::new()];
            for piece in pattern {
                partial = match piece {
                    Piece::Text(text) => partial.into_iter().map(|h| h + text).collect(),
                    Piece::Group(Ranges(ranges)) => {
                        let mut next = Vec::new();
                        for head in &partial {
                            for &(lo, hi, width) in ranges {
                                for n in lo..=hi {
                                    if hosts.len() + next.len() >= limit {
                                        return Err(format!("names more than {limit} hosts"));
                                    }
                                    next.push(format!("{head}{n:0width$}"));
                                }
                            }
                        }
                        next
                    }
                };
            }
            hosts.extend(partial);
            if hosts.len() > limit {
                return Err(format!("names more than {limit} hosts"));
            }
        }
        Ok(hosts)
    }
}

/// Splits at the commas that are not inside brackets, checking that brackets
/// pair up and do not nest.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err(format!("nests brackets at byte {i}")),
            '[' => depth = 1,
            ']' if depth == 0 => return Err(format!("closes a bracket it never opened at byte {i}")),
            ']' => depth = 0,
            ',' if depth == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err("leaves a bracket open".into());
    }
    parts.push(&list[start..]);
    Ok(parts)
}

/// One host pattern: text and bracket groups (brackets already checked).
fn parse_pattern(pattern: &str) -> Result<Vec<Piece>, String> {
    if pattern.is_empty() {
        return Err("has an empty host name".into());
    }
    let mut pieces = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('[') {
        let close = open + rest[open..].find(']').expect("brackets were checked to pair");
        if open > 0 {
            pieces.push(Piece::Text(check_text(&rest[..open])?));
        }
        pieces.push(Piece::Group(parse_group(&rest[open + 1..close])?));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(check_text(rest)?));
    }
    Ok(pieces)
}

fn check_text(text: &str) -> Result<String, String> {
    match text.chars().find(|c| c.is_whitespace() || c.is_control()) {
        Some(c) => Err(format!("has {c:?} in host name {text:?}")),
        None => Ok(text.to_string()),
    }
}

/// The inside of one bracket group: `01-04,07`.
fn parse_group(group: &str) -> Result<Ranges, String> {
    if group.is_empty() {
        return Err("has an empty bracket group".into());
    }
    let mut ranges = Vec::new();
    for item in group.split(',') {
        let (lo_text, hi_text) = item.split_once('-').unwrap_or((item, item));
        let lo = parse_number(lo_text, group)?;
        let hi = parse_number(hi_text, group)?;
        if hi < lo {
            return Err(format!("has a range that runs backwards in [{group}]"));
        }
        ranges.push((lo, hi, lo_text.len()));
    }
    Ok(Ranges(ranges))
}

fn parse_number(text: &str, group: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("has {text:?} where a number belongs in [{group}]"));
    }
    text.parse().map_err(|_| format!("has a number too large in [{group}]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &str) -> Vec<String> {
        Hostlist::parse(list).unwrap().expand(10_000).unwrap()
    }

    #[test]
    fn plain_names_and_comma_lists() {
        assert_eq!(hosts("node7"), ["node7"]);
        assert_eq!(hosts("a,b.example.org,c-1"), ["a", "b.example.org", "c-1"]);
        assert_eq!(hosts(" vm "), ["vm"]);
    }

    #[test]
    fn ranges_keep_their_zero_padding() {
        assert_eq!(
            hosts("gpu[01-04,07],cpu3"),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]
        );
        assert_eq!(hosts("n[8-11]"), ["n8", "n9", "n10", "n11"]);
        assert_eq!(hosts("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(hosts("n[5]"), ["n5"]);
    }

    #[test]
    fn several_groups_and_suffixes() {
        assert_eq!(hosts("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert_eq!(hosts("node[1-2]-ib,login"), ["node1-ib", "node2-ib", "login"]);
        assert_eq!(hosts("[1-2]x"), ["1x", "2x"]);
    }

    #[test]
    fn the_first_host_needs_no_expansion() {
        assert_eq!(Hostlist::parse("gpu[07-99999999999],cpu3").unwrap().first(), "gpu07");
        assert_eq!(Hostlist::parse("r[3,1]n[002-004]-ib").unwrap().first(), "r3n002-ib");
        assert!(Hostlist::parse("n[1-99999999999]").unwrap().expand(100).is_err());
    }

    #[test]
    fn malformed_lists_say_what_is_wrong() {
        for (list, why) in [
            ("", "empty"),
            ("a,,b", "empty host name"),
            ("a,", "empty host name"),
            ("n[1-3", "open"),
            ("n1-3]", "never opened"),
            ("n[[1]]", "nests"),
            ("n[]", "empty bracket group"),
            ("n[1-]", "where a number belongs"),
            ("n[-3]", "where a number belongs"),
            ("n[a-c]", "where a number belongs"),
            ("n[1,,2]", "where a number belongs"),
            ("n[5-3]", "backwards"),
            ("n[1-2-3]", "where a number belongs"),
            ("n[99999999999999999999999]", "too large"),
            ("two words", "in host name"),
        ] {
            let err = Hostlist::parse(list).unwrap_err();
            assert!(err.contains(why), "{list:?}: {err:?} should say {why:?}");
        }
    }

    #[test]
    fn step_ports_stay_in_their_range_and_apart() {
        assert_eq!(step_port(0, 0), 15000);
        assert_eq!(step_port(1234, 2), 15000 + 2340 + 2);
        // Batch and extern steps have ids near u32::MAX.
        assert!((15000..25000).contains(&step_port(u64::MAX, 4294967294)));
        // Concurrent jobs (ids close together) and the steps of one job differ.
        let mut seen = std::collections::HashSet::new();
        for job in 5000..5100 {
            for step in 0..10 {
                assert!(seen.insert(step_port(job, step)));
            }
        }
    }
}
