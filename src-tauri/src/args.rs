//! The desktop app's command line: `--data-dir DIR` (so tests and portable installs can keep the
//! data elsewhere), `--help` and `--version`. Plain std parsing; the shell has nothing else to
//! configure.

use anyhow::{bail, Context};
use std::ffi::OsString;
use std::path::PathBuf;

pub const USAGE: &str = "\
Usage: local-diffusers-desktop [--data-dir DIR]

Opens the Local Diffusers window. The app's server listens on 127.0.0.1 only.

Options:
  --data-dir DIR   Folder for settings, gallery, models and logs
                   (default: the platform's app data folder)
  -h, --help       Print this help
  -V, --version    Print the version
";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Options),
    Help,
    Version,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub data_dir: Option<PathBuf>,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<Command> {
    let mut opts = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        match text.as_ref() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--data-dir" => {
                let dir = args.next().context("--data-dir needs a folder after it")?;
                opts.data_dir = Some(non_empty(dir.into())?);
            }
            _ => {
                if let Some(dir) = text.strip_prefix("--data-dir=") {
                    opts.data_dir = Some(non_empty(dir.into())?);
                } else {
                    bail!("unknown argument '{text}'");
                }
            }
        }
    }
    Ok(Command::Run(opts))
}

fn non_empty(dir: PathBuf) -> anyhow::Result<PathBuf> {
    if dir.as_os_str().is_empty() {
        bail!("--data-dir needs a folder, not an empty string");
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> anyhow::Result<Command> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn no_arguments_use_the_default_data_folder() {
        assert_eq!(parse_strs(&[]).unwrap(), Command::Run(Options::default()));
    }

    #[test]
    fn data_dir_in_both_spellings() {
        let want = Command::Run(Options {
            data_dir: Some(PathBuf::from("/tmp/x y")),
        });
        assert_eq!(parse_strs(&["--data-dir", "/tmp/x y"]).unwrap(), want);
        assert_eq!(parse_strs(&["--data-dir=/tmp/x y"]).unwrap(), want);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_strs(&["--help"]).unwrap(), Command::Help);
        assert_eq!(parse_strs(&["-V"]).unwrap(), Command::Version);
    }

    #[test]
    fn mistakes_are_errors_not_ignored() {
        assert!(parse_strs(&["--data-dir"]).is_err());
        assert!(parse_strs(&["--data-dir="]).is_err());
        assert!(parse_strs(&["--port", "1"]).is_err());
    }
}
