//! `rovl diff`, `rovl apply`, `rovl check`: layers as data (the library's
//! `diff`, `apply` and `fsck`), with digests, compression, a progress bar
//! on a terminal and `--json` for tools.

use super::args::{ApplyArgs, CheckArgs, DiffArgs};
use super::CmdResult;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// A writer that counts, and hashes (sha256) unless told not to, what
/// passes through it.
struct Hashing<W> {
    inner: W,
    hash: Option<Sha256>,
    len: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W, hash: bool) -> Self {
        Hashing {
            inner,
            hash: hash.then(Sha256::new),
            len: 0,
        }
    }

    fn digest(&self) -> Option<String> {
        let d = self.hash.clone()?.finalize();
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        Some(format!("sha256:{hex}"))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What the writer thread wrote.
struct Written {
    digest: String,
    diff_id: String,
    size: u64,
}

/// The tar, handed in 1 MiB chunks to a thread that hashes, compresses and
/// writes it: the walk never waits for sha256, gzip or the output.
struct Pipe {
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    worker: Option<std::thread::JoinHandle<std::io::Result<Written>>>,
}

const CHUNK: usize = 1 << 20;

impl Pipe {
    fn start<W: Write + Send + 'static>(comp: Compressor<Hashing<W>>) -> Pipe {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let worker = std::thread::spawn(move || {
            let mut tar = Hashing::new(comp, true);
            for chunk in rx {
                tar.write_all(&chunk)?;
            }
            let diff_id = tar.digest().expect("hashed");
            let mut blob = tar.inner.finish()?;
            blob.flush()?;
            Ok(Written {
                digest: blob.digest().unwrap_or_else(|| diff_id.clone()),
                diff_id,
                size: blob.len,
            })
        });
        Pipe {
            buf: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            worker: Some(worker),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the writer stopped");
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(chunk)
            .map_err(|_| gone())
    }

    /// Sends what is left and waits for the writer.
    fn finish(mut self) -> std::io::Result<Written> {
        let sent = if self.buf.is_empty() {
            Ok(())
        } else {
            self.send()
        };
        self.tx = None;
        let r = match self.worker.take().map(|w| w.join()) {
            Some(Ok(r)) => r,
            _ => Err(std::io::Error::other("the writer thread failed")),
        };
        // The writer's own error says more than the closed channel.
        r.and_then(|w| sent.map(|()| w))
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The layer's compression.
enum Compressor<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Compressor<W> {
    fn finish(self) -> std::io::Result<W> {
        match self {
            Compressor::Plain(w) => Ok(w),
            Compressor::Gzip(g) => g.finish(),
            Compressor::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Compressor::Plain(w) => w.write(buf),
            Compressor::Gzip(g) => g.write(buf),
            Compressor::Zstd(z) => z.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Compressor::Plain(w) => w.flush(),
            Compressor::Gzip(g) => g.flush(),
            Compressor::Zstd(z) => z.flush(),
        }
    }
}

/// A spinner counting entries, drawn only when stderr is a terminal.
fn progress(what: &'static str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {human_pos} entries ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(what);
    pb
}

/// Where a command's output goes: a temporary name beside FILE, renamed
/// over it once complete, so a failure leaves FILE as it was.
struct OutFile {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl OutFile {
    fn create(dest: &Path) -> Result<(OutFile, std::fs::File), String> {
        let mut name = dest
            .file_name()
            .ok_or_else(|| format!("rovl: -o {}: give a file name", dest.display()))?
            .to_os_string();
        name.push(format!(".rovl-tmp-{}", std::process::id()));
        let tmp = dest.with_file_name(name);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| format!("rovl: -o {}: {e}", dest.display()))?;
        let o = OutFile {
            tmp,
            dest: dest.to_path_buf(),
            done: false,
        };
        Ok((o, f))
    }

    fn commit(mut self) -> Result<(), String> {
        std::fs::rename(&self.tmp, &self.dest)
            .map_err(|e| format!("rovl: -o {}: {e}", self.dest.display()))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn lowers(arg: &Option<String>) -> Option<Vec<PathBuf>> {
    arg.as_ref().map(|s| {
        s.split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect()
    })
}

pub fn diff_cmd(a: DiffArgs) -> CmdResult {
    let to_stdout = a.output.is_none();
    if to_stdout && std::io::stdout().is_terminal() {
        return Err(
            "rovl diff: not writing a tar to a terminal: give -o FILE or redirect stdout".into(),
        );
    }
    let (out_file, sink): (Option<OutFile>, Box<dyn Write + Send>) = match &a.output {
        Some(p) => {
            let (o, f) = OutFile::create(p)?;
            (Some(o), Box::new(f))
        }
        None => (None, Box::new(std::io::stdout())),
    };
    let sink = std::io::BufWriter::with_capacity(1 << 20, sink);
    // Uncompressed, the blob is the tar: hashed once.
    let compressed = a.gzip || a.zstd;
    let blob = Hashing::new(sink, compressed);
    let comp = if a.gzip {
        Compressor::Gzip(flate2::write::GzEncoder::new(
            blob,
            flate2::Compression::default(),
        ))
    } else if a.zstd {
        Compressor::Zstd(
            zstd::stream::write::Encoder::new(blob, 3).map_err(|e| format!("rovl diff: {e}"))?,
        )
    } else {
        Compressor::Plain(blob)
    };
    let mut pipe = Pipe::start(comp);
    let pb = progress("diff");
    let lowers = lowers(&a.lower);
    let walked = rovl::diff::write_layer(&a.upper, lowers.as_deref(), &mut pipe, &mut |n| {
        if n % 256 == 0 {
            pb.set_position(n);
        }
    });
    pb.finish_and_clear();
    // A failed write is the writer's error to tell.
    let written = pipe
        .finish()
        .map_err(|e| format!("rovl diff: writing the layer: {e}"));
    let (summary, w) = match (walked, written) {
        (Err(e), Ok(_)) => return Err(e.to_string()),
        (_, Err(e)) => return Err(e),
        (Ok(s), Ok(w)) => (s, w),
    };
    let Written {
        digest,
        diff_id,
        size,
    } = w;
    if let Some(o) = out_file {
        o.commit()?;
    }
    let media = match (a.gzip, a.zstd) {
        (true, _) => "application/vnd.oci.image.layer.v1.tar+gzip",
        (_, true) => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => "application/vnd.oci.image.layer.v1.tar",
    };
    let text = if a.json {
        serde_json::json!({
            "digest": digest,
            "diff_id": diff_id,
            "media_type": media,
            "size": size,
            "entries": summary.entries,
            "data_bytes": summary.bytes,
        })
        .to_string()
    } else {
        format!(
            "digest: {digest}\ndiff-id: {diff_id}\nsize: {size}\nentries: {}",
            summary.entries
        )
    };
    // The tar owns stdout; the summary then goes to stderr.
    if to_stdout {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
    Ok(())
}

pub fn apply_cmd(a: ApplyArgs) -> CmdResult {
    let input: Box<dyn std::io::Read> = if a.layer.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(&a.layer)
                .map_err(|e| format!("rovl apply: {}: {e}", a.layer.display()))?,
        )
    };
    let opts = rovl::apply::ApplyOptions {
        userxattr: a.userxattr || rovl::sys::euid() != 0,
        allow_devices: a.allow_devices,
    };
    let pb = progress("apply");
    let s = rovl::apply::apply_layer(input, &a.dir, &opts, &mut |n| {
        if n % 256 == 0 {
            pb.set_position(n);
        }
    })
    .map_err(|e| e.to_string())?;
    pb.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "dir": a.dir,
                "entries": s.entries,
                "whiteouts": s.whiteouts,
                "opaque_dirs": s.opaque_dirs,
                "data_bytes": s.bytes,
            })
        );
    } else {
        println!(
            "applied {} entries to {} ({} whiteouts, {} opaque dirs, {} bytes of data)",
            s.entries,
            a.dir.display(),
            s.whiteouts,
            s.opaque_dirs,
            s.bytes
        );
    }
    Ok(())
}

/// Returns fsck's exit status (0 clean, 1 all repaired, 4 problems left).
pub fn check_cmd(a: CheckArgs) -> Result<u8, String> {
    let opts = rovl::fsck::CheckOptions {
        repair: a.repair,
        userxattr: a.userxattr || rovl::sys::euid() != 0,
    };
    let lowers = lowers(&a.lower);
    let r = rovl::fsck::check(&a.upper, &a.work, lowers.as_deref(), &opts)
        .map_err(|e| e.to_string())?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| format!("rovl check: {e}"))?
        );
    } else {
        for f in &r.findings {
            match &f.repaired {
                Some(what) => println!("{}: {} ({what})", f.path, f.problem),
                None => println!("{}: {}", f.path, f.problem),
            }
        }
        let fixed = r.findings.iter().filter(|f| f.repaired.is_some()).count();
        match (r.findings.len(), a.repair) {
            (0, _) => println!("clean"),
            (n, true) => println!("{n} problems, {fixed} repaired"),
            (n, false) => println!("{n} problems (--repair fixes what is safe)"),
        }
    }
    Ok(r.exit_code())
}
