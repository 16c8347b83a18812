//! The `rovl` command line (the binary's half; the filesystem is the
//! library's): argument definitions, mount, umount, list.

pub mod args;
pub mod daemon;
pub mod layers;
pub mod list;
pub mod mount;
pub mod stats;
pub mod umount;

use args::{Cli, Cmd};
use clap::Parser;
use std::io::Write;
use std::process::ExitCode;

/// Errors are one line for stderr; empty means already reported.
pub type CmdResult = Result<(), String>;

/// Where log lines go: stderr, or the `--log-file` once it is opened
/// (after the daemon's fork, which closes every inherited fd).
struct LogTarget;

static LOG_FILE: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

impl Write for LogTarget {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(f) => f.write(buf),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(f) => f.flush(),
            None => std::io::stderr().flush(),
        }
    }
}

/// Opens (appends to) the log file; from then on logs go there.
pub fn open_log_file(path: &std::path::Path) -> CmdResult {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("rovl: --log-file {}: {e}", path.display()))?;
    *LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    Ok(())
}

/// `RUST_LOG` rules; else warnings, or with `-d` rovl's debug lines
/// (fuser's own are left out: rovl logs each request with its outcome).
pub fn init_logger(common: &args::Common) {
    let default = match (common.debug, common.log_file.is_some()) {
        (true, _) => "rovl=debug",
        // Asked for a log: what the daemon does, not only what goes wrong.
        (false, true) => "rovl=info",
        (false, false) => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .target(env_logger::Target::Pipe(Box::new(LogTarget)))
        .init();
}

fn print(bytes: std::io::Result<Vec<u8>>) -> CmdResult {
    let bytes = bytes.map_err(|e| format!("rovl: {e}"))?;
    std::io::stdout()
        .write_all(&bytes)
        .map_err(|e| format!("rovl: {e}"))
}

pub fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(msg) = args::early_check(&argv) {
        eprintln!("{msg}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse_from(argv);
    let result = match cli.cmd {
        Some(Cmd::Mount(m)) => mount::mount_cmd(m.common, &m.options, m.args),
        Some(Cmd::Umount(u)) => {
            init_logger(&u.common);
            umount::umount_cmd(&u.mountpoint, u.lazy)
        }
        Some(Cmd::List(l)) => list::list_cmd(l.json),
        Some(Cmd::Stats(s)) => stats::stats_cmd(&s.mountpoint, s.json),
        Some(Cmd::Diff(d)) => {
            init_logger(&args::Common::default());
            layers::diff_cmd(d)
        }
        Some(Cmd::Apply(a)) => {
            init_logger(&args::Common::default());
            layers::apply_cmd(a)
        }
        Some(Cmd::Check(c)) => {
            init_logger(&args::Common::default());
            return match layers::check_cmd(c) {
                Ok(code) => ExitCode::from(code),
                Err(msg) => {
                    eprintln!("{msg}");
                    ExitCode::from(8)
                }
            };
        }
        Some(Cmd::Version) => {
            println!("rovl {}", args::long_version());
            Ok(())
        }
        Some(Cmd::Completions { shell }) => print(Ok(args::completions(shell))),
        Some(Cmd::Man) => print(args::man_page()),
        None => mount::mount_cmd(cli.common, &cli.options, cli.args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("{msg}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::args::*;
    use clap::{CommandFactory, Parser};
    use std::ffi::OsString;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn forms(argv: &[&str]) -> (Option<&'static str>, Vec<String>, Vec<String>, bool, bool) {
        let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let s = |v: Vec<OsString>| {
            v.into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        match cli.cmd {
            Some(Cmd::Mount(m)) => (
                Some("mount"),
                m.options,
                s(m.args),
                m.common.foreground,
                m.common.debug,
            ),
            Some(Cmd::Umount(u)) => (
                Some("umount"),
                vec![],
                vec![u.mountpoint.display().to_string()],
                u.common.foreground,
                u.common.debug,
            ),
            Some(other) => panic!("{other:?}"),
            None => (
                None,
                cli.options,
                s(cli.args),
                cli.common.foreground,
                cli.common.debug,
            ),
        }
    }

    #[test]
    fn invocation_forms() {
        assert_eq!(
            forms(&[
                "rovl",
                "mount",
                "-f",
                "-o",
                "lowerdir=a:b",
                "-o",
                "ro",
                "/m"
            ]),
            (
                Some("mount"),
                vec!["lowerdir=a:b".into(), "ro".into()],
                vec!["/m".into()],
                true,
                false
            )
        );
        assert_eq!(
            forms(&["rovl", "umount", "/m"]),
            (Some("umount"), vec![], vec!["/m".into()], false, false)
        );
        assert_eq!(
            forms(&["rovl", "src", "/m", "-o", "lowerdir=a:b", "-d"]),
            (
                None,
                vec!["lowerdir=a:b".into()],
                vec!["src".into(), "/m".into()],
                false,
                true
            )
        );
        assert_eq!(
            forms(&["rovl", "-o", "lowerdir=a:b", "/m", "-f"]),
            (
                None,
                vec!["lowerdir=a:b".into()],
                vec!["/m".into()],
                true,
                false
            )
        );
        assert_eq!(
            forms(&["rovl", "-olowerdir=a:b", "--foreground", "/m"]),
            (
                None,
                vec!["lowerdir=a:b".into()],
                vec!["/m".into()],
                true,
                false
            )
        );
        assert!(Cli::try_parse_from(["rovl", "mount", "/m"]).is_err());
        assert!(Cli::try_parse_from(["rovl", "-o", "x"]).is_err());
        assert!(Cli::try_parse_from(["rovl", "a", "b", "c"]).is_err());
        assert!(Cli::try_parse_from(["rovl", "umount"]).is_err());
    }

    fn early(argv: &[&str]) -> Option<String> {
        let v: Vec<OsString> = argv.iter().map(OsString::from).collect();
        early_check(&v)
    }

    #[test]
    fn typos_get_a_suggestion() {
        let m = early(&["rovl", "mnt", "-o", "lowerdir=a", "/m"]).unwrap();
        assert!(m.contains("did you mean 'rovl mount'?"), "{m}");
        assert!(early(&["rovl", "umout", "/m"])
            .unwrap()
            .contains("'rovl umount'"));
        assert!(early(&["rovl", "lst"]).unwrap().contains("'rovl list'"));
        assert!(early(&["rovl", "verison"])
            .unwrap()
            .contains("'rovl version'"));
        // The three mount forms and real subcommands pass.
        assert_eq!(early(&["rovl", "mount", "-o", "lowerdir=a", "/m"]), None);
        assert_eq!(early(&["rovl", "-o", "lowerdir=a", "/m"]), None);
        assert_eq!(early(&["rovl", "overlay", "/m", "-o", "lowerdir=a"]), None);
        assert_eq!(early(&["rovl", "rovl", "/m", "-o", "lowerdir=a"]), None);
        assert_eq!(early(&["rovl", "./merged", "-o", "lowerdir=a"]), None);
    }

    #[test]
    fn bare_rovl_shows_the_usage() {
        let m = early(&["rovl"]).unwrap();
        assert!(m.starts_with("usage: rovl mount -o lowerdir="), "{m}");
    }

    #[test]
    fn man_page_and_completions_render() {
        let man = String::from_utf8(man_page().unwrap()).unwrap();
        assert!(
            man.contains(".TH rovl") && man.contains("lowerdir"),
            "{man}"
        );
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let c = String::from_utf8(completions(shell)).unwrap();
            assert!(c.contains("umount") && c.contains("list"), "{shell:?}");
        }
    }

    #[test]
    fn version_names_the_protocol_and_kernel() {
        let v = long_version();
        assert!(
            v.contains("FUSE protocol 7.") && v.contains("kernel "),
            "{v}"
        );
    }
}
