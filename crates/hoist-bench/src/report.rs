//! Results: one row per measurement with the DESIGN.md §7 bar it is held against, printed as a table
//! or JSON, plus the rollout progress plot (a hand-written SVG so the tool needs no plotting crate).

use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// How a measured value is compared with its bar.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cmp {
    /// The value must be strictly below the bar.
    Below,
    /// The value may equal the bar.
    AtMost,
    /// Informational: no bar applies.
    None,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    pub bar: Option<f64>,
    pub cmp: Cmp,
    /// How the number was obtained, when that matters to read it (sample size, fleet size...).
    pub note: String,
}

impl Row {
    pub fn info(scenario: &str, metric: &str, value: f64, unit: &str, note: impl Into<String>) -> Row {
        Row { scenario: scenario.into(), metric: metric.into(), value, unit: unit.into(), bar: None, cmp: Cmp::None, note: note.into() }
    }

    pub fn below(scenario: &str, metric: &str, value: f64, unit: &str, bar: f64, note: impl Into<String>) -> Row {
        Row { bar: Some(bar), cmp: Cmp::Below, ..Row::info(scenario, metric, value, unit, note) }
    }

    pub fn at_most(scenario: &str, metric: &str, value: f64, unit: &str, bar: f64, note: impl Into<String>) -> Row {
        Row { bar: Some(bar), cmp: Cmp::AtMost, ..Row::info(scenario, metric, value, unit, note) }
    }

    pub fn verdict(&self) -> &'static str {
        match (self.cmp, self.bar) {
            (Cmp::Below, Some(bar)) if self.value < bar => "PASS",
            (Cmp::AtMost, Some(bar)) if self.value <= bar => "PASS",
            (Cmp::None, _) | (_, None) => "",
            _ => "MISS",
        }
    }
}

#[derive(Serialize)]
struct JsonRow<'a> {
    #[serde(flatten)]
    row: &'a Row,
    verdict: &'static str,
}

pub fn print(rows: &[Row], json: bool) {
    if json {
        let out: Vec<JsonRow> = rows.iter().map(|row| JsonRow { row, verdict: row.verdict() }).collect();
        println!("{}", serde_json::to_string_pretty(&out).expect("rows serialise"));
        return;
    }
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let bar = match (r.cmp, r.bar) {
                (Cmp::Below, Some(b)) => format!("< {} {}", num(b), r.unit),
                (Cmp::AtMost, Some(b)) => format!("<= {} {}", num(b), r.unit),
                _ => String::new(),
            };
            [r.scenario.clone(), r.metric.clone(), format!("{} {}", num(r.value), r.unit), bar, r.verdict().into(), r.note.clone()]
        })
        .collect();
    let header = ["scenario", "metric", "measured", "bar (DESIGN.md §7)", "result", "note"].map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String; 6]| {
        let mut s = String::new();
        for (c, w) in row.iter().zip(widths) {
            let _ = write!(s, "{c:<w$}  ");
        }
        println!("{}", s.trim_end());
    };
    line(&header);
    line(&widths.map(|w| "-".repeat(w)));
    cells.iter().for_each(line);
}

/// Three significant decimals at most, without trailing noise.
fn num(v: f64) -> String {
    let s = if v.abs() >= 100.0 { format!("{v:.1}") } else { format!("{v:.3}") };
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Percentile (nearest rank) of an unsorted sample.
pub fn percentile(sample: &[f64], p: f64) -> f64 {
    let mut sorted = sample.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One line of a plot: a name, a colour and (x, y) points, drawn as a step function since counts
/// change in jumps.
pub struct Series {
    pub name: String,
    pub colour: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// Writes the series as CSV (`seconds,<name>...`, one row per distinct x) and as an SVG line plot.
pub fn write_plot(csv: &Path, svg: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    if let Some(dir) = csv.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(csv, to_csv(series))?;
    std::fs::write(svg, to_svg(title, series))?;
    Ok(())
}

fn to_csv(series: &[Series]) -> String {
    let mut xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut out = String::from("seconds");
    for s in series {
        let _ = write!(out, ",{}", s.name);
    }
    out.push('\n');
    for x in xs {
        let _ = write!(out, "{x:.3}");
        for s in series {
            let _ = write!(out, ",{}", value_at(&s.points, x));
        }
        out.push('\n');
    }
    out
}

/// The step function's value at x: the last point at or before it.
fn value_at(points: &[(f64, f64)], x: f64) -> f64 {
    points.iter().take_while(|p| p.0 <= x).last().map_or(0.0, |p| p.1)
}

fn to_svg(title: &str, series: &[Series]) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 400.0, 60.0, 20.0, 40.0, 50.0);
    // Axes end on a round tick at or past the data.
    let data_x = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(1e-9_f64, f64::max);
    let data_y = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(1.0_f64, f64::max);
    let (step_x, step_y) = (tick_step(data_x), tick_step(data_y));
    let (max_x, max_y) = ((data_x / step_x).ceil() * step_x, (data_y / step_y).ceil() * step_y);
    let px = |x: f64| left + x / max_x * (w - left - right);
    let py = |y: f64| h - bottom - y / max_y * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        escape(title)
    );
    let _ = writeln!(svg, "<path d=\"M{left},{top} V{} H{}\" stroke=\"black\" fill=\"none\"/>", h - bottom, w - right);
    let decimals = usize::from(step_x.fract() != 0.0);
    for xv in ticks(max_x, step_x) {
        let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{xv:.decimals$}</text>", px(xv), h - bottom + 16.0);
    }
    for yv in ticks(max_y, step_y) {
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{yv:.0}</text>", left - 6.0, py(yv) + 4.0);
        let _ = writeln!(svg, "<path d=\"M{left},{:.1} H{}\" stroke=\"#ddd\"/>", py(yv), w - right);
    }
    let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds since the KV put</text>", w / 2.0, h - 12.0);
    let _ = writeln!(svg, "<text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\">instances</text>", h / 2.0);
    for (i, s) in series.iter().enumerate() {
        let mut d = String::new();
        let mut last_y = 0.0;
        for (j, &(x, y)) in s.points.iter().enumerate() {
            if j == 0 {
                let _ = write!(d, "M{:.1},{:.1}", px(x), py(y));
            } else {
                let _ = write!(d, " H{:.1} V{:.1}", px(x), py(y));
            }
            last_y = y;
        }
        let _ = write!(d, " H{:.1} V{:.1}", px(max_x), py(last_y));
        let _ = writeln!(svg, "<path d=\"{d}\" stroke=\"{}\" stroke-width=\"2\" fill=\"none\"/>", s.colour);
        let ly = top + 14.0 + 16.0 * i as f64;
        let _ = writeln!(svg, "<path d=\"M{},{ly} h20\" stroke=\"{}\" stroke-width=\"3\"/>", w - right - 150.0, s.colour);
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\">{}</text>", w - right - 124.0, ly + 4.0, escape(&s.name));
    }
    svg.push_str("</svg>\n");
    svg
}

/// A round tick step (1, 2 or 5 × 10^k) that cuts `0..=max` into at most five intervals.
fn tick_step(max: f64) -> f64 {
    let rough = max / 5.0;
    let magnitude = 10_f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|step| *step >= rough).unwrap_or(10.0 * magnitude)
}

fn ticks(max: f64, step: f64) -> impl Iterator<Item = f64> {
    (0..=(max / step).round() as u32).map(move |i| f64::from(i) * step)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_data() {
        assert_eq!(tick_step(23.3), 5.0);
        assert_eq!(tick_step(1000.0), 200.0);
        assert_eq!(tick_step(105.3), 50.0);
        assert_eq!(tick_step(0.9), 0.2);
        assert_eq!(ticks(25.0, 5.0).collect::<Vec<_>>(), [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]);
    }
}
