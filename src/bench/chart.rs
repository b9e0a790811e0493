//! Percentile charts, as the study drew them: latency (log scale) against
//! the percentile on a log axis from 0 to 99.9999 %, one line per series,
//! several runs overlaid. Reads the JSON of `weir bench latency` and of
//! `weir bench run` (OMB's result format); writes SVG or PNG with plotters.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

/// The percentile axis ends at 99.9999 %: log10(100 / (100 - p)) = 6.
const NINES_MAX: f64 = 6.0;
/// Latencies below this (ms) are drawn at it: the y axis is logarithmic.
const LATENCY_MS_MIN: f64 = 0.001;
/// The largest report file a chart reads.
const REPORT_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Line colours, distinct on white and in grey print; then Palette99.
const COLORS: [RGBAColor; 8] = [
    RGBAColor(97, 97, 97, 1.0),
    RGBAColor(25, 118, 210, 1.0),
    RGBAColor(211, 47, 47, 1.0),
    RGBAColor(56, 142, 60, 1.0),
    RGBAColor(245, 124, 0, 1.0),
    RGBAColor(123, 31, 162, 1.0),
    RGBAColor(0, 151, 167, 1.0),
    RGBAColor(121, 85, 72, 1.0),
];
/// Chart size in pixels.
const SIZE: (u32, u32) = (1200, 750);

/// One line: a label and (percentile, latency in ms) points.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("{path}: {message}")]
    Input { path: String, message: String },
    #[error("{path}: the chart's file name must end in .svg or .png")]
    Format { path: String },
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
}

/// The curves of one report file: every series of a `weir bench latency`
/// report, or the publish and end-to-end series of an OMB result (weir's
/// own results give those from the intended send time, `weir.series`; a
/// result of OMB itself, its aggregated quantiles), each report's floor
/// included. Labels start with `label`, or else the run's target (or
/// driver).
///
/// # Errors
/// The file is not a report, or cannot be read.
pub fn curves_from_file(path: &Path, label: Option<&str>) -> Result<Vec<Curve>, ChartError> {
    let input = |message: String| ChartError::Input { path: path.display().to_string(), message };
    let length = std::fs::metadata(path).map_err(|error| input(error.to_string()))?.len();
    if length > REPORT_FILE_BYTES_MAX {
        return Err(input(format!("larger than {REPORT_FILE_BYTES_MAX} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|error| input(error.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|error| input(error.to_string()))?;
    curves_from_report(&value, label).map_err(input)
}

/// As [`curves_from_file`], from parsed JSON.
///
/// # Errors
/// The JSON is neither report format.
pub fn curves_from_report(report: &serde_json::Value, label: Option<&str>) -> Result<Vec<Curve>, String> {
    let text = |value: Option<&serde_json::Value>| value.and_then(|value| value.as_str()).map(str::to_owned);
    if let Some(end_to_end) = report.get("aggregatedEndToEndLatencyQuantiles") {
        let driver = label.map(str::to_owned).or_else(|| text(report.get("driver"))).unwrap_or_else(|| "run".into());
        if let Some(weir) = report.get("weir") {
            let wanted = |name: &str| name == "publish" || name == "end-to-end";
            return Ok(summaries(weir.get("floor"), weir.get("series"), &driver, wanted));
        }
        let mut curves = Vec::new();
        for (name, quantiles) in
            [("publish", report.get("aggregatedPublishLatencyQuantiles")), ("end-to-end", Some(end_to_end))]
        {
            let Some(map) = quantiles.and_then(|quantiles| quantiles.as_object()) else { continue };
            let mut points: Vec<(f64, f64)> = map
                .iter()
                .filter_map(|(percentile, ms)| Some((percentile.parse::<f64>().ok()?, ms.as_f64()?)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            curves.push(Curve { label: format!("{driver}: {name}"), points });
        }
        return Ok(curves);
    }
    if report.get("series").and_then(|series| series.as_array()).is_none() {
        return Err("neither a `weir bench latency` report nor an OMB result".into());
    }
    let target =
        label.map(str::to_owned).or_else(|| text(report.pointer("/header/target"))).unwrap_or_else(|| "run".into());
    Ok(summaries(report.get("floor"), report.get("series"), &target, |_| true))
}

/// Curves of serialized [`super::recorder::Summary`] lists: the floor's as
/// they are named, the others' (those `wanted`) prefixed with `target`.
fn summaries(
    floor: Option<&serde_json::Value>,
    series: Option<&serde_json::Value>,
    target: &str,
    wanted: impl Fn(&str) -> bool,
) -> Vec<Curve> {
    let list =
        |value: Option<&serde_json::Value>| value.and_then(|value| value.as_array()).cloned().unwrap_or_default();
    let mut curves = Vec::new();
    for (is_floor, summary) in
        list(floor).iter().map(|summary| (true, summary)).chain(list(series).iter().map(|summary| (false, summary)))
    {
        let name = summary.get("name").and_then(|name| name.as_str()).unwrap_or("series");
        if !is_floor && !wanted(name) {
            continue;
        }
        let pairs = summary
            .get("distribution_ms")
            .and_then(|points| points.as_array())
            .filter(|points| !points.is_empty())
            .or_else(|| summary.get("percentiles_ms").and_then(|points| points.as_array()));
        let points = pairs
            .into_iter()
            .flatten()
            .filter_map(|pair| Some((pair.get(0)?.as_f64()?, pair.get(1)?.as_f64()?)))
            .collect();
        let label = if is_floor { name.to_owned() } else { format!("{target}: {name}") };
        curves.push(Curve { label, points });
    }
    curves
}

/// Several reports' curves on one chart: a floor that several reports
/// measured appears once (the first report's).
pub fn overlay(reports: Vec<Vec<Curve>>) -> Vec<Curve> {
    let mut curves: Vec<Curve> = Vec::new();
    for curve in reports.into_iter().flatten() {
        let repeated_floor = curve.label.starts_with("floor") && curves.iter().any(|seen| seen.label == curve.label);
        if !repeated_floor {
            curves.push(curve);
        }
    }
    curves
}

/// Where a percentile sits on the chart's x axis: the number of nines.
fn nines(percentile: f64) -> f64 {
    if percentile >= 100.0 { NINES_MAX } else { (100.0 / (100.0 - percentile)).log10().clamp(0.0, NINES_MAX) }
}

fn nines_label(nines: f64) -> String {
    let percentile = 100.0 - 100.0 / 10f64.powf(nines);
    format!("{}%", (percentile * 1e4).round() / 1e4)
}

/// Draws `curves` into `path` (`.svg` or `.png`).
///
/// # Errors
/// The extension is neither, or drawing failed.
pub fn draw(curves: &[Curve], title: &str, path: &Path) -> Result<(), ChartError> {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // DejaVu Sans is compiled in: a fresh machine or a container has no
        // fonts to find.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
    let shown = path.display().to_string();
    let draw_error = |error: String| ChartError::Draw { path: shown.clone(), message: error };
    match path.extension().and_then(|extension| extension.to_str()) {
        Some("svg") => {
            let root = SVGBackend::new(path, SIZE).into_drawing_area();
            plot(&root, curves, title).map_err(draw_error)?;
            root.present().map_err(|error| draw_error(error.to_string()))
        }
        Some("png") => {
            let root = BitMapBackend::new(path, SIZE).into_drawing_area();
            plot(&root, curves, title).map_err(draw_error)?;
            root.present().map_err(|error| draw_error(error.to_string()))
        }
        _ => Err(ChartError::Format { path: shown }),
    }
}

fn plot<B: DrawingBackend>(
    root: &DrawingArea<B, plotters::coord::Shift>,
    curves: &[Curve],
    title: &str,
) -> Result<(), String> {
    let text = |error: DrawingAreaErrorKind<B::ErrorType>| error.to_string();
    root.fill(&WHITE).map_err(text)?;
    let values = curves.iter().flat_map(|curve| curve.points.iter().map(|&(_, ms)| ms.max(LATENCY_MS_MIN)));
    let (low, high) = values.fold((f64::MAX, f64::MIN), |(low, high), ms| (low.min(ms), high.max(ms)));
    let (low, high) = if low > high { (LATENCY_MS_MIN, 1.0) } else { (low / 1.5, high * 1.5) };
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .margin_right(50)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..NINES_MAX, (low..high).log_scale())
        .map_err(text)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(NINES_MAX as usize + 1)
        .x_label_formatter(&|nines| nines_label(*nines))
        .y_label_formatter(&|ms| format!("{ms}"))
        .draw()
        .map_err(text)?;
    for (index, curve) in curves.iter().enumerate() {
        let color = COLORS.get(index).copied().unwrap_or_else(|| Palette99::pick(index).to_rgba());
        let points = curve.points.iter().map(|&(percentile, ms)| (nines(percentile), ms.max(LATENCY_MS_MIN)));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(text)?
            .label(curve.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentile_axis_counts_nines() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.99) - 4.0).abs() < 1e-9);
        assert_eq!(nines(100.0), NINES_MAX);
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(6.0), "99.9999%");
    }

    #[test]
    fn curves_come_from_both_report_formats() {
        let latency = serde_json::json!({
            "header": {"target": "weir 0.1.0"},
            "floor": [{"name": "floor, 1024 B", "percentiles_ms": [[50.0, 0.09]], "distribution_ms": []}],
            "series": [{"name": "end-to-end, 1024 B", "percentiles_ms": [[50.0, 0.5]], "distribution_ms": [[0.0, 0.2], [50.0, 0.5]]}],
        });
        let curves = curves_from_report(&latency, None).unwrap();
        assert_eq!(curves.len(), 2);
        assert_eq!(curves[0], Curve { label: "floor, 1024 B".into(), points: vec![(50.0, 0.09)] });
        assert_eq!(curves[1].label, "weir 0.1.0: end-to-end, 1024 B");
        assert_eq!(curves[1].points, [(0.0, 0.2), (50.0, 0.5)]);

        let omb = serde_json::json!({
            "driver": "NATS JetStream",
            "aggregatedPublishLatencyQuantiles": {"99.0": 2.0, "50.0": 1.0},
            "aggregatedEndToEndLatencyQuantiles": {"50.0": 1.5},
        });
        let curves = curves_from_report(&omb, None).unwrap();
        assert_eq!(curves[0].label, "NATS JetStream: publish");
        assert_eq!(curves[0].points, [(50.0, 1.0), (99.0, 2.0)]);
        assert!(curves_from_report(&serde_json::json!({"x": 1}), None).is_err());

        // weir's own OMB results: the corrected series, the floor, a label.
        let weir = serde_json::json!({
            "driver": "weir at 127.0.0.1:7450",
            "aggregatedEndToEndLatencyQuantiles": {"50.0": 1.0},
            "weir": {
                "floor": [{"name": "floor, 1024 B", "percentiles_ms": [[50.0, 0.03]]}],
                "series": [
                    {"name": "publish", "percentiles_ms": [[50.0, 0.4]]},
                    {"name": "end-to-end", "percentiles_ms": [[50.0, 0.5]]},
                    {"name": "publish delay", "percentiles_ms": [[50.0, 0.1]]},
                ],
            },
        });
        let curves = curves_from_report(&weir, Some("weir never")).unwrap();
        let labels: Vec<&str> = curves.iter().map(|curve| curve.label.as_str()).collect();
        assert_eq!(labels, ["floor, 1024 B", "weir never: publish", "weir never: end-to-end"]);
        let twice = overlay(vec![curves.clone(), curves_from_report(&weir, Some("weir always")).unwrap()]);
        assert_eq!(twice.len(), 5, "one floor for both: {twice:?}");
    }

    #[test]
    fn charts_are_written_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let curves = [
            Curve { label: "a".into(), points: vec![(0.0, 0.1), (50.0, 0.2), (99.9, 3.0), (100.0, 9.0)] },
            Curve { label: "b".into(), points: vec![(0.0, 0.0), (99.0, 1.0)] },
        ];
        let svg = dir.path().join("chart.svg");
        draw(&curves, "test", &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("99.9999%") && text.contains("\na\n"), "{text}");
        let png = dir.path().join("chart.png");
        draw(&curves, "test", &png).unwrap();
        assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
        assert!(matches!(draw(&curves, "test", &dir.path().join("chart.gif")), Err(ChartError::Format { .. })));
    }
}
