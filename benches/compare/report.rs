//! Results: medians and minima per subject, ratios to the kernel, the
//! printed table and the JSON file.

use std::fmt::Write as _;

/// A daemon's memory, in KiB, from /proc/PID/status.
#[derive(Clone, Copy, Debug)]
pub struct Rss {
    /// `VmHWM` once settled after the cache drop: the peak over its whole life.
    pub peak: u64,
    /// `VmRSS` right after the walk.
    pub walked: u64,
    /// `VmRSS` once settled after the cache drop (FORGETs handled).
    pub now: u64,
    /// How long settling took.
    pub settle_ms: u64,
}

/// One timed run.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub secs: f64,
    /// The daemon's memory, for the memory workloads.
    pub rss: Option<Rss>,
}

pub enum Status {
    Ok,
    Failed(String),
    Skipped(String),
}

pub struct SubjectResult {
    pub subject: String,
    pub samples: Vec<Sample>,
    pub status: Status,
}

pub struct WorkloadResult {
    pub name: String,
    pub about: String,
    /// Entries walked, for a memory workload.
    pub entries: Option<usize>,
    /// Set when the whole workload was skipped (a missing tool, say).
    pub skipped: Option<String>,
    pub subjects: Vec<SubjectResult>,
}

pub const KERNEL: &str = "kernel";

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl SubjectResult {
    pub fn ok(&self) -> bool {
        matches!(self.status, Status::Ok) && !self.samples.is_empty()
    }

    pub fn median(&self) -> Option<f64> {
        median(self.samples.iter().map(|s| s.secs).collect())
    }

    pub fn min(&self) -> Option<f64> {
        self.samples.iter().map(|s| s.secs).min_by(f64::total_cmp)
    }

    /// Median peak, after-walk and settled RSS in MiB.
    pub fn rss_mib(&self) -> Option<(f64, f64, f64)> {
        let r: Vec<Rss> = self.samples.iter().filter_map(|s| s.rss).collect();
        let mib = |f: fn(&Rss) -> u64| median(r.iter().map(|x| f(x) as f64 / 1024.0).collect());
        Some((mib(|x| x.peak)?, mib(|x| x.walked)?, mib(|x| x.now)?))
    }
}

impl WorkloadResult {
    fn kernel_median(&self) -> Option<f64> {
        self.subjects
            .iter()
            .find(|s| s.subject == KERNEL && s.ok())
            .and_then(SubjectResult::median)
    }

    /// Median over the kernel's median, when both exist.
    pub fn ratio(&self, s: &SubjectResult) -> Option<f64> {
        if !s.ok() {
            return None;
        }
        Some(s.median()? / self.kernel_median()?)
    }
}

fn fmt_secs(s: f64) -> String {
    if s >= 10.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

/// The table for one workload, as printed after it ran.
pub fn print_workload(w: &WorkloadResult) {
    println!("\n== {}: {}", w.name, w.about);
    if let Some(why) = &w.skipped {
        println!("   skipped: {why}");
        return;
    }
    println!(
        "   {:<22} {:>10} {:>10} {:>8}",
        "subject", "median", "min", "/kernel"
    );
    for s in &w.subjects {
        match &s.status {
            Status::Skipped(why) => println!("   {:<22} skipped: {why}", s.subject),
            Status::Failed(why) => println!("   {:<22} FAILED: {why}", s.subject),
            Status::Ok => {
                let (Some(med), Some(min)) = (s.median(), s.min()) else {
                    println!("   {:<22} no samples", s.subject);
                    continue;
                };
                let ratio = w.ratio(s).map_or("-".into(), |r| format!("{r:.2}"));
                let mut line = format!(
                    "   {:<22} {:>10} {:>10} {:>8}",
                    s.subject,
                    fmt_secs(med),
                    fmt_secs(min),
                    ratio
                );
                if let Some((peak, walked, now)) = s.rss_mib() {
                    let _ = write!(
                        line,
                        "   RSS peak {peak:.1} MiB, after walk {walked:.1}, after drop {now:.1}"
                    );
                }
                println!("{line}");
            }
        }
    }
}

/// Ratios of medians to the kernel, one row per workload.
pub fn print_summary(all: &[WorkloadResult], subjects: &[String]) {
    println!("\n== summary: median time / kernel median (lower is better)");
    let mut head = format!("   {:<22}", "workload");
    for s in subjects {
        let _ = write!(head, " {:>20}", s);
    }
    println!("{head}");
    for w in all.iter().filter(|w| w.skipped.is_none()) {
        let mut line = format!("   {:<22}", w.name);
        for name in subjects {
            let cell = match w.subjects.iter().find(|s| &s.subject == name) {
                None => "-".to_string(),
                Some(s) => match &s.status {
                    Status::Skipped(_) => "n/a".into(),
                    Status::Failed(_) => "FAILED".into(),
                    Status::Ok => match (w.ratio(s), s.median()) {
                        (Some(r), _) => format!("{r:.2}"),
                        (None, Some(m)) => fmt_secs(m),
                        _ => "-".into(),
                    },
                },
            };
            let _ = write!(line, " {cell:>20}");
        }
        println!("{line}");
    }
}

/// Daemon memory per memory workload: peak (`VmHWM`) / settled `VmRSS` after the cache drop.
pub fn print_memory(all: &[WorkloadResult], subjects: &[String]) {
    let mem: Vec<&WorkloadResult> = all
        .iter()
        .filter(|w| w.entries.is_some() && w.skipped.is_none())
        .collect();
    if mem.is_empty() {
        return;
    }
    println!("\n== memory: daemon RSS in MiB, peak (VmHWM) / now (VmRSS after the walk and a cache drop)");
    let mut head = format!("   {:<22}", "entries walked");
    let shown: Vec<&String> = subjects
        .iter()
        .filter(|n| {
            mem.iter().any(|w| {
                w.subjects
                    .iter()
                    .any(|s| &s.subject == *n && !matches!(s.status, Status::Skipped(_)))
            })
        })
        .collect();
    for s in &shown {
        let _ = write!(head, " {:>20}", s);
    }
    println!("{head}");
    for w in mem {
        let mut line = format!("   {:<22}", w.entries.unwrap_or(0));
        for name in &shown {
            let cell = match w.subjects.iter().find(|s| &s.subject == *name) {
                None => "-".to_string(),
                Some(s) => match (&s.status, s.rss_mib()) {
                    (Status::Failed(_), _) => "FAILED".into(),
                    (Status::Skipped(_), _) => "n/a".into(),
                    (Status::Ok, Some((peak, _, now))) => format!("{peak:.1} / {now:.1}"),
                    (Status::Ok, None) => "-".into(),
                },
            };
            let _ = write!(line, " {cell:>20}");
        }
        println!("{line}");
    }
}

/// A JSON string literal.
pub fn js(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn jnum(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x}"),
        _ => "null".into(),
    }
}

/// The whole run as JSON. `header` holds already-encoded `"key": value` pairs.
pub fn to_json(header: &[(String, String)], all: &[WorkloadResult]) -> String {
    let mut o = String::from("{\n");
    for (k, v) in header {
        let _ = writeln!(o, "  {}: {v},", js(k));
    }
    o.push_str("  \"workloads\": [\n");
    for (i, w) in all.iter().enumerate() {
        let _ = write!(
            o,
            "    {{\"name\": {}, \"about\": {}, \"entries\": {}, \"skipped\": {}, \"subjects\": [",
            js(&w.name),
            js(&w.about),
            w.entries.map_or("null".into(), |n| n.to_string()),
            w.skipped.as_deref().map_or("null".into(), js)
        );
        for (j, s) in w.subjects.iter().enumerate() {
            let (status, why) = match &s.status {
                Status::Ok => ("ok", None),
                Status::Failed(e) => ("failed", Some(e.as_str())),
                Status::Skipped(e) => ("skipped", Some(e.as_str())),
            };
            let samples: Vec<String> = s.samples.iter().map(|x| format!("{}", x.secs)).collect();
            let _ = write!(
                o,
                "{}\n      {{\"subject\": {}, \"status\": {}, \"reason\": {}, \"samples_s\": [{}], \
                 \"median_s\": {}, \"min_s\": {}, \"ratio_to_kernel\": {}",
                if j == 0 { "" } else { "," },
                js(&s.subject),
                js(status),
                why.map_or("null".into(), js),
                samples.join(", "),
                jnum(s.median()),
                jnum(s.min()),
                jnum(w.ratio(s)),
            );
            if let Some((peak, walked, now)) = s.rss_mib() {
                let kib: Vec<String> = s
                    .samples
                    .iter()
                    .filter_map(|x| x.rss)
                    .map(|r| format!("[{}, {}, {}]", r.peak, r.walked, r.now))
                    .collect();
                let settle: Vec<String> = s
                    .samples
                    .iter()
                    .filter_map(|x| x.rss)
                    .map(|r| r.settle_ms.to_string())
                    .collect();
                let _ = write!(
                    o,
                    ", \"rss_peak_mib\": {peak}, \"rss_after_walk_mib\": {walked}, \
                     \"rss_now_mib\": {now}, \"rss_samples_kib_peak_walk_now\": [{}], \
                     \"rss_settle_ms\": [{}]",
                    kib.join(", "),
                    settle.join(", ")
                );
            }
            o.push('}');
        }
        let _ = write!(
            o,
            "\n    ]}}{}\n",
            if i + 1 == all.len() { "" } else { "," }
        );
    }
    o.push_str("  ]\n}\n");
    o
}
