//! Sizes in bytes as people write them ("80GiB", "512MiB", "16GB", "4096") and back.
//!
//! Shared by the agent's config file and job specs, so that a size means the same everywhere.

/// Binary units [`format_bytes`] may print, largest first, as (name, shift): the unit is 2^shift
/// bytes. [`parse_bytes`] accepts all of them, so a formatted size parses back.
const BINARY_UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];

/// Parses a size such as "80GiB", "512MiB", "16GB" or "1024" (bytes).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| {
        format!("{text:?} is not a size: expected a number and a unit such as \"80GiB\"")
    })?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "K" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        "TB" | "T" => 1_000_000_000_000,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "TiB" | "Ti" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            ))
        }
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes <= 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

/// Prints a size in the largest binary unit that divides it exactly, up to TiB: 17179869184 is
/// "16GiB", 1536 is "1536B" (not "1.5KiB": the result is always a whole number), 0 is "0B".
///
/// [`parse_bytes`] reads the result back to the same value for every size up to 2^53 bytes (8 PiB),
/// the range in which its `f64` arithmetic is exact.
pub fn format_bytes(bytes: u64) -> String {
    if bytes != 0 {
        for (unit, shift) in BINARY_UNITS {
            if bytes.trailing_zeros() >= shift {
                return format!("{}{unit}", bytes >> shift);
            }
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("80GiB"), Ok(80 << 30));
        assert_eq!(parse_bytes("16GB"), Ok(16_000_000_000));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("0GiB").is_err());
        assert!(parse_bytes("GiB").is_err());
    }

    #[test]
    fn sizes_print_in_the_largest_exact_binary_unit() {
        for (bytes, expected) in [
            (0, "0B"),
            (1, "1B"),
            (1000, "1000B"),
            (1024, "1KiB"),
            (1536, "1536B"),
            (3 << 19, "1536KiB"),
            (3 << 29, "1536MiB"),
            (17_179_869_184, "16GiB"),
            (16_000_000_000, "15625000KiB"),
            (1 << 40, "1TiB"),
            (1 << 50, "1024TiB"),
            (u64::MAX, "18446744073709551615B"),
        ] {
            assert_eq!(format_bytes(bytes), expected, "{bytes} bytes");
        }
    }

    proptest! {
        #[test]
        fn formatted_sizes_parse_back(bytes in 1u64..=(1 << 53)) {
            prop_assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
        }

        #[test]
        fn formatted_binary_multiples_parse_back(n in 1u64..(1 << 13), shift in 0u32..=40) {
            let bytes = n << shift;
            prop_assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
        }
    }
}
