//! Summaries of samples: percentiles, medians, rates.

use std::time::Duration;

/// The median and the 99th percentile of `samples`, in microseconds.
pub fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

/// The median of some measurements.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Rates in millions per second, two decimals, space-separated.
pub fn millions(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{:.2}", r / 1e6))
        .collect::<Vec<_>>()
        .join(" ")
}
