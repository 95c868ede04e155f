//! How the CLI shows things: a table, JSON or YAML (`-o`); colour only when stdout is a terminal
//! and `NO_COLOR` is unset; times as local time with how long ago; and the exit codes.

use crate::client::{ApiError, Unreachable};
use anyhow::{Context, Result};
use clap::ValueEnum;
use serde::Serialize;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exit codes, the same for every command.
pub mod exit_code {
    // `OK` and `USAGE` are never passed to `exit` here (success returns from `main`, clap exits
    // with 2 itself); they are written down so that the table is whole.
    #[allow(dead_code)]
    pub const OK: i32 = 0;
    /// Any failure without a more specific code.
    pub const ERROR: i32 = 1;
    /// Bad arguments (clap exits with it).
    #[allow(dead_code)]
    pub const USAGE: i32 = 2;
    /// The job, node or member named does not exist (HTTP 404).
    pub const NOT_FOUND: i32 = 3;
    /// It conflicts with what exists: an idempotency key reused with another spec, a file that
    /// would be overwritten (HTTP 409).
    pub const CONFLICT: i32 = 4;
    /// No coordinator answered, or none could commit (HTTP 503): worth retrying.
    pub const UNAVAILABLE: i32 = 5;
}

/// For `gantry --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  error
  2  bad arguments
  3  not found (no such job, node or member)
  4  conflict (idempotency key reused with another spec, file exists without --force)
  5  unavailable (no coordinator answered, or none could commit): retry later";

/// The exit code for an error, from the most specific cause in its chain.
pub fn exit_code_for(error: &anyhow::Error) -> i32 {
    for cause in error.chain() {
        if let Some(api) = cause.downcast_ref::<ApiError>() {
            return match api.status {
                404 => exit_code::NOT_FOUND,
                409 => exit_code::CONFLICT,
                503 => exit_code::UNAVAILABLE,
                _ => exit_code::ERROR,
            };
        }
        if cause.is::<Unreachable>() {
            return exit_code::UNAVAILABLE;
        }
        if cause.is::<crate::templates::FileExists>() {
            return exit_code::CONFLICT;
        }
    }
    exit_code::ERROR
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, pretty-printed.
    Json,
    /// The same document as YAML.
    Yaml,
}

/// Prints `value` as JSON or YAML, or calls `table` to print it for people.
pub fn emit<T: Serialize>(output: Output, value: &T, table: impl FnOnce(&T)) -> Result<()> {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).context("encode JSON")?
        ),
        Output::Yaml => print!(
            "{}",
            serde_yaml_ng::to_string(value).context("encode YAML")?
        ),
        Output::Table => table(value),
    }
    Ok(())
}

/// Colour on stdout: only to a terminal, and never when `NO_COLOR` is set to anything non-empty
/// (no-color.org) or the terminal is `dumb`.
pub fn colour_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        std::io::stdout().is_terminal() && !no_color && !dumb
    })
}

/// The ANSI colour for a state word, by what it means to the reader: done or well (green), on
/// its way (cyan), waiting (yellow), broken (red).
pub fn state_colour(state: &str) -> Option<&'static str> {
    match state {
        "ready" | "succeeded" | "healthy" | "leader" => Some("32"),
        "running" | "starting" => Some("36"),
        "pending" | "draining" | "cancelled" => Some("33"),
        "down" | "failed" | "lost" | "unhealthy" => Some("31"),
        _ => None,
    }
}

/// For [`print_table_coloured`]: colours the state words of column `state_column_idx`.
pub fn state_column(state_column_idx: usize) -> impl Fn(usize, &str) -> Option<&'static str> {
    move |column_idx, cell| {
        if column_idx == state_column_idx {
            state_colour(cell)
        } else {
            None
        }
    }
}

/// Prints aligned columns. No colour.
pub fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    print_table_coloured(header, rows, |_, _| None);
}

/// Prints aligned columns; `colour(column, cell)` may give a cell an ANSI colour, used only when
/// [`colour_enabled`]. Widths are measured on the plain text.
pub fn print_table_coloured<const N: usize>(
    header: &[&str; N],
    rows: &[[String; N]],
    colour: impl Fn(usize, &str) -> Option<&'static str>,
) {
    print!("{}", format_table(header, rows, colour_enabled(), colour));
}

/// Aligned columns, one line each (with its newline), with ANSI colours when `coloured`.
pub fn format_table<const N: usize>(
    header: &[&str; N],
    rows: &[[String; N]],
    coloured: bool,
    colour: impl Fn(usize, &str) -> Option<&'static str>,
) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>, is_header: bool| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .zip(widths)
            .map(|((column, cell), width)| {
                let text = format!("{cell:<width$}");
                let code = if !coloured {
                    None
                } else if is_header {
                    Some("1")
                } else {
                    colour(column, cell)
                };
                match code {
                    Some(code) => {
                        let pad = text.len() - cell.len();
                        format!("\x1b[{code}m{cell}\x1b[0m{}", " ".repeat(pad))
                    }
                    None => text,
                }
            })
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut text = line(header.to_vec(), true);
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect(), false));
    }
    text
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A moment in the local time zone (the system's; UTC where it has none, as in a bare image).
pub fn local_time(unix_ms: u64) -> String {
    let Ok(timestamp) = jiff::Timestamp::from_millisecond(unix_ms as i64) else {
        return format!("{unix_ms} ms after 1970");
    };
    let zone = jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC);
    timestamp
        .to_zoned(zone)
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// `2026-05-04 13:02:11 CEST (3m ago)`.
pub fn local_time_ago(unix_ms: u64, now_ms: u64) -> String {
    format!("{} ({})", local_time(unix_ms), ago(unix_ms, now_ms))
}

/// `3m ago`, `2h ago`, `just now`; `in 4s` for a moment ahead of this clock.
pub fn ago(unix_ms: u64, now_ms: u64) -> String {
    if now_ms >= unix_ms {
        let elapsed = Duration::from_millis(now_ms - unix_ms);
        if elapsed < Duration::from_secs(1) {
            "just now".into()
        } else {
            format!("{} ago", coarse_duration(elapsed))
        }
    } else {
        format!(
            "in {}",
            coarse_duration(Duration::from_millis(unix_ms - now_ms))
        )
    }
}

/// The largest unit only: `3m`, `2h`, `5d`, `45s`.
fn coarse_duration(duration: Duration) -> String {
    let mut text = human_duration(duration);
    if let Some(end) = text.find(|c: char| c.is_ascii_alphabetic()) {
        text.truncate(end + 1);
    }
    text
}

/// The two largest units: `1m12s`, `3h5m`, `2d4h`, `45s`, `0s`.
pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    let units = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let Some(first) = units.iter().position(|(n, _)| *n > 0) else {
        return "0s".into();
    };
    units[first..]
        .iter()
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        for (secs, long, short) in [
            (0, "0s", "0s"),
            (45, "45s", "45s"),
            (72, "1m12s", "1m"),
            (180, "3m", "3m"),
            (3600 + 5 * 60 + 9, "1h5m", "1h"),
            (2 * 86_400 + 4 * 3600, "2d4h", "2d"),
            (86_400 + 30, "1d", "1d"),
        ] {
            let duration = Duration::from_secs(secs);
            assert_eq!(human_duration(duration), long, "{secs}");
            assert_eq!(coarse_duration(duration), short, "{secs}");
        }
    }

    #[test]
    fn ages_count_back_from_now() {
        let now = 1_700_000_000_000;
        assert_eq!(ago(now - 200, now), "just now");
        assert_eq!(ago(now - 192_000, now), "3m ago");
        assert_eq!(ago(now + 4_000, now), "in 4s");
    }

    #[test]
    fn times_are_written_as_a_date_and_a_zone() {
        let text = local_time(1_700_000_000_000);
        // The zone depends on the machine; the shape does not.
        assert!(text.starts_with("2023-11-1"), "{text}");
        assert_eq!(text.matches(':').count(), 2, "{text}");
    }
}
