//! Kubernetes resource quantities ("3920m", "16Gi", "1.5", "2e3") read exactly, as Kubernetes
//! reads them: a decimal number with an optional binary (`Ki`..`Ei`), decimal SI (`n`..`E`) or
//! exponent (`e3`) suffix, rounded up to the thousandth.

/// Characters accepted in a quantity; longer ones are refused rather than risking overflow.
const QUANTITY_CHARS_MAX: usize = 40;

/// The quantity in thousandths (CPU millis, or bytes times 1000), rounded up like Kubernetes
/// rounds CPU requests; `None` when it is not a non-negative quantity.
pub fn quantity_millis(quantity: &str) -> Option<u128> {
    let quantity = quantity.trim();
    if quantity.is_empty() || quantity.len() > QUANTITY_CHARS_MAX {
        return None;
    }
    let quantity = quantity.strip_prefix('+').unwrap_or(quantity);
    let number_end = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let mut digits: u128 = 0;
    for c in whole.chars().chain(fraction.chars()) {
        digits = digits
            .checked_mul(10)?
            .checked_add(u128::from(c.to_digit(10)?))?;
    }
    let (binary_shift, exponent10): (u32, i32) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        exponent => {
            let exponent = exponent.strip_prefix(['e', 'E'])?;
            let value: i32 = exponent.parse().ok()?;
            if !(-30..=30).contains(&value) {
                return None;
            }
            (0, value)
        }
    };
    // value * 1000 = digits * 2^shift * 10^(exponent10 + 3 - fraction digits)
    let scaled = digits.checked_mul(1u128.checked_shl(binary_shift)?)?;
    let power = exponent10 + 3 - i32::try_from(fraction.len()).ok()?;
    if power >= 0 {
        scaled.checked_mul(10u128.checked_pow(power.unsigned_abs())?)
    } else {
        let divisor = 10u128.checked_pow(power.unsigned_abs())?;
        Some(scaled.div_ceil(divisor))
    }
}

/// Whole units (bytes, GPUs), rounded up.
pub fn quantity_units(quantity: &str) -> Option<u64> {
    u64::try_from(quantity_millis(quantity)?.div_ceil(1000)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_quantities_as_kubernetes_does() {
        let cases: &[(&str, Option<u128>)] = &[
            ("1", Some(1000)),
            ("3920m", Some(3920)),
            ("0.1", Some(100)),
            ("1.5", Some(1500)),
            ("100m", Some(100)),
            ("1Ki", Some(1024 * 1000)),
            ("16Gi", Some(16 * (1 << 30) * 1000)),
            ("129M", Some(129_000_000 * 1000)),
            ("2e3", Some(2_000_000)),
            ("1E3", Some(1_000_000)),
            ("500n", Some(1)), // rounded up to a thousandth
            ("+2", Some(2000)),
            (".5", Some(500)),
            ("128974848", Some(128_974_848_000)),
            ("", None),
            ("-1", None),
            ("1Zi", None),
            ("abc", None),
            (".", None),
            ("99999999999999999999999999999999999999999", None),
        ];
        for (quantity, expected) in cases {
            assert_eq!(quantity_millis(quantity), *expected, "{quantity:?}");
        }
        assert_eq!(quantity_units("64Mi"), Some(64 << 20));
        assert_eq!(quantity_units("4"), Some(4));
        assert_eq!(quantity_units("1m"), Some(1));
    }
}
