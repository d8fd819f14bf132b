//! `--config PATH`: a TOML file of the settings an operator keeps (`scripts/deploy/chorus.toml`).
//! Its keys are the long flags of the subcommand (`http = "127.0.0.1:8080"`,
//! `trusted-proxy = ["127.0.0.1"]`, `dev-public = true`) and the global ones (`log-format =
//! "json"`); a flag on the command line or its environment variable wins over the file, and a
//! key that is no flag is an error naming it.
//!
//! The file is turned into flags: each key that neither the command line nor the environment
//! set is appended to the arguments as `--key=value`, and clap parses the whole again, so a
//! value in the file is checked exactly like the same flag typed by hand.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, Command};

/// Largest config file read: settings are a few hundred bytes; anything near this is no
/// config file.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Why the config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Over [`MAX_CONFIG_BYTES`].
    #[error("config file {}: larger than {MAX_CONFIG_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not TOML.
    #[error("config file {}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (line and column included).
        message: String,
    },
    /// A key that is no long flag of the subcommand.
    #[error("config file {}: unknown key {key:?}; the keys are the long flags of `chorus {command}`: {known}", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The subcommand.
        command: String,
        /// Its long flags, comma-separated.
        known: String,
    },
    /// A value of the wrong kind for its key.
    #[error("config file {}: key {key:?}: {why}", path.display())]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        why: String,
    },
}

/// `argv` with the settings of the subcommand's `--config` file (if any) appended as flags, for
/// every key the command line and the environment left unset. Arguments clap refuses are
/// returned unchanged, for clap to report.
pub fn with_config(cmd: &Command, mut argv: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Ok(matches) = cmd.clone().try_get_matches_from(&argv) else {
        return Ok(argv);
    };
    let Some((name, sub)) = matches.subcommand() else {
        return Ok(argv);
    };
    let Ok(Some(path)) = sub.try_get_one::<PathBuf>("config") else {
        return Ok(argv);
    };
    let sub_cmd = cmd.find_subcommand(name).expect("clap matched it");
    // An unbuilt command lists its global flags (`--log-format`) on itself, not on the
    // subcommand they apply to: look there too, and read their source from the top level.
    let globals = || cmd.get_arguments().filter(|a| a.is_global_set());
    let table = read(path)?;
    for (key, value) in &table {
        let is_key = |a: &&clap::Arg| a.get_long() == Some(key.as_str()) && key != "config";
        let (arg, source) = match sub_cmd.get_arguments().find(is_key) {
            Some(a) => (a, sub.value_source(a.get_id().as_str())),
            None => match globals().find(is_key) {
                Some(a) => (a, matches.value_source(a.get_id().as_str())),
                None => {
                    return Err(ConfigError::UnknownKey {
                        path: path.clone(),
                        key: key.clone(),
                        command: name.to_owned(),
                        known: sub_cmd
                            .get_arguments()
                            .chain(globals())
                            .filter(|a| !a.is_hide_set())
                            .filter_map(|a| a.get_long())
                            .filter(|l| *l != "config" && *l != "help")
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            },
        };
        let set_elsewhere = matches!(
            source,
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if set_elsewhere {
            continue;
        }
        let bad = |why: &str| ConfigError::Value {
            path: path.clone(),
            key: key.clone(),
            why: why.to_owned(),
        };
        match (arg.get_action(), value) {
            (ArgAction::SetTrue, toml::Value::Boolean(on)) => {
                if *on {
                    argv.push(format!("--{key}").into());
                }
            }
            (ArgAction::SetTrue, _) => return Err(bad("is a switch: true or false")),
            (ArgAction::Append, toml::Value::Array(items)) => {
                for item in items {
                    argv.push(flag(key, item).ok_or_else(|| bad("a list of strings or numbers"))?);
                }
            }
            (_, toml::Value::Array(_)) => return Err(bad("takes one value, not a list")),
            (_, v) => argv.push(flag(key, v).ok_or_else(|| bad("a string or a number"))?),
        }
    }
    Ok(argv)
}

fn read(path: &Path) -> Result<toml::Table, ConfigError> {
    let io = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    if std::fs::metadata(path).map_err(io)?.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })
}

/// `--key=value` for a scalar (a `=` so that a value starting with `-` stays a value).
fn flag(key: &str, v: &toml::Value) -> Option<OsString> {
    let v = match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        _ => return None,
    };
    Some(format!("--{key}={v}").into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cli() -> Command {
        Command::new("chorus")
            .arg(
                Arg::new("log_format")
                    .long("log-format")
                    .global(true)
                    .env("CHORUS_TEST_CONFIG_LOG_FORMAT")
                    .default_value("text"),
            )
            .subcommand(
                Command::new("serve")
                    .arg(
                        Arg::new("config")
                            .long("config")
                            .value_parser(clap::value_parser!(PathBuf)),
                    )
                    .arg(
                        Arg::new("http")
                            .long("http")
                            .default_value("127.0.0.1:8080"),
                    )
                    .arg(
                        Arg::new("api_key")
                            .long("api-key")
                            .env("CHORUS_TEST_CONFIG_API_KEY"),
                    )
                    .arg(
                        Arg::new("dev_public")
                            .long("dev-public")
                            .action(ArgAction::SetTrue),
                    )
                    .arg(
                        Arg::new("trusted_proxy")
                            .long("trusted-proxy")
                            .action(ArgAction::Append),
                    )
                    .arg(Arg::new("ws_ping_ms").long("ws-ping-ms").hide(true)),
            )
    }

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chorus-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn run(args: &[&str]) -> Result<Vec<String>, ConfigError> {
        let argv = args.iter().map(OsString::from).collect();
        with_config(&cli(), argv).map(|a| {
            a.into_iter()
                .skip(args.len())
                .map(|s| s.into_string().unwrap())
                .collect()
        })
    }

    #[test]
    fn keys_become_flags_the_command_line_wins() {
        let p = file(
            "ok.toml",
            "http = \"0.0.0.0:80\"\nws-ping-ms = 500\ndev-public = true\ntrusted-proxy = [\"10.0.0.0/8\", \"::1\"]\napi-key = \"-starts-with-dash\"\nlog-format = \"json\"\n",
        );
        let p = p.to_str().unwrap();
        let mut added = run(&["chorus", "serve", "--config", p]).unwrap();
        added.sort();
        assert_eq!(
            added,
            [
                "--api-key=-starts-with-dash",
                "--dev-public",
                "--http=0.0.0.0:80",
                "--log-format=json",
                "--trusted-proxy=10.0.0.0/8",
                "--trusted-proxy=::1",
                "--ws-ping-ms=500",
            ]
        );
        let added = run(&[
            "chorus",
            "serve",
            "--config",
            p,
            "--http",
            "127.0.0.1:1",
            "--trusted-proxy",
            "1.2.3.4",
            "--log-format",
            "text",
        ])
        .unwrap();
        assert!(
            !added.iter().any(|a| a.starts_with("--http")
                || a.starts_with("--trusted-proxy")
                || a.starts_with("--log-format")),
            "{added:?}"
        );
        // A global flag given before the subcommand wins too.
        let added = run(&["chorus", "--log-format", "text", "serve", "--config", p]).unwrap();
        assert!(
            !added.iter().any(|a| a.starts_with("--log-format")),
            "{added:?}"
        );
        // The environment wins too.
        std::env::set_var("CHORUS_TEST_CONFIG_API_KEY", "from-env");
        let added = run(&["chorus", "serve", "--config", p]).unwrap();
        std::env::remove_var("CHORUS_TEST_CONFIG_API_KEY");
        assert!(
            !added.iter().any(|a| a.starts_with("--api-key")),
            "{added:?}"
        );
        // No --config: nothing added.
        assert!(run(&["chorus", "serve"]).unwrap().is_empty());
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let p = file("unknown.toml", "htp = \"x\"\n");
        let e = run(&["chorus", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("unknown key \"htp\"")
                && m.contains("http, api-key, dev-public, trusted-proxy, log-format"),
            "{m}"
        );
        assert!(
            !m.contains("ws-ping-ms"),
            "hidden flags are not advertised: {m}"
        );
        let p = file("switch.toml", "dev-public = \"yes\"\n");
        let e = run(&["chorus", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(
            e.to_string().contains("key \"dev-public\": is a switch"),
            "{e}"
        );
        let p = file("list.toml", "http = [\"a\", \"b\"]\n");
        let e = run(&["chorus", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("takes one value"), "{e}");
        let p = file("syntax.toml", "http = \n");
        let e = run(&["chorus", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        let e = run(&["chorus", "serve", "--config", "/nonexistent/chorus.toml"]).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        let p = file("self.toml", "config = \"other.toml\"\n");
        let e = run(&["chorus", "serve", "--config", p.to_str().unwrap()]).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownKey { .. }), "{e}");
    }
}
