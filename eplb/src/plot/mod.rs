//! Charts of a replay, for people (`epserve eplb replay --plot DIR`), drawn with `plotters` into PNG
//! and SVG files:
//!
//! - `expert-load.{png,svg}`: per MoE layer, each expert's share of the layer's routed tokens over
//!   the whole trace (a heatmap, layer × expert, the share printed in every cell): where the skew
//!   is, whatever the placement;
//! - `imbalance-over-time.{png,svg}`: each counted step's imbalance (max / mean worker load, summed
//!   over layers as [`crate::replay`] defines it), one line per placement, in trace order;
//! - `worker-load-histogram.{png,svg}`: per placement, how the (step, layer, worker) loads spread
//!   around their (step, layer) mean: a balanced placement piles up at 1, a skewed one has a tail.
//!
//! Text is drawn with a subset of DejaVu Sans (ASCII and a few symbols) compiled into the binary,
//! so that charts render the same on any host, with or without system fonts (plotters' `ttf`
//! feature would need fontconfig); in PNGs through [`text::GlyphText`]. PNGs are encoded with the
//! workspace's `image` crate.

mod text;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use crate::error::PlotError;
use crate::load::LoadMatrix;
use crate::replay::{HISTOGRAM_BIN_WIDTH, HISTOGRAM_BINS, StepReplay};

/// DejaVu Sans (Bitstream Vera license, `eplb/assets/DejaVuSans-LICENSE.txt`), subset to printable
/// ASCII and `µ · × ÷ – — ≤ ≥ ≈ Σ ’` with fonttools' `pyftsubset`: 24 KB instead of 740 KB.
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// One placement to chart: its name (legends, panel titles) and its replay.
#[derive(Debug, Clone, Copy)]
pub struct PlottedPlacement<'a> {
    pub name: &'a str,
    pub replay: &'a StepReplay,
}

/// Line colours of the placements, in order (the first is usually the current placement).
const COLOURS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// Writes the three charts into `dir` (created if missing), each as PNG and SVG; returns the paths
/// written. `min_step_tokens`: the per-step charts show steps of at least this many tokens, as the
/// replay's per-step figures do (all steps when none is that large).
pub fn write_plots(
    dir: &Path,
    loads: &LoadMatrix,
    placements: &[PlottedPlacement<'_>],
    min_step_tokens: u32,
) -> Result<Vec<PathBuf>, PlotError> {
    register_font_once()?;
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Io { path: dir.to_owned(), source })?;
    let inputs = Inputs { loads, placements, min_step_tokens };
    let mut written = Vec::new();
    for chart in [Chart::ExpertLoad, Chart::ImbalanceOverTime, Chart::WorkerLoadHistogram] {
        written.extend(render(dir, chart, &inputs)?);
    }
    Ok(written)
}

/// plotters lays text out (label areas, legends) with the font registered under [`FAMILY`].
fn register_font_once() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

struct Inputs<'a> {
    loads: &'a LoadMatrix,
    placements: &'a [PlottedPlacement<'a>],
    min_step_tokens: u32,
}

#[derive(Debug, Clone, Copy)]
enum Chart {
    ExpertLoad,
    ImbalanceOverTime,
    WorkerLoadHistogram,
}

impl Chart {
    fn file_stem(self) -> &'static str {
        match self {
            Chart::ExpertLoad => "expert-load",
            Chart::ImbalanceOverTime => "imbalance-over-time",
            Chart::WorkerLoadHistogram => "worker-load-histogram",
        }
    }

    fn size(self, inputs: &Inputs<'_>) -> (u32, u32) {
        match self {
            Chart::ExpertLoad => (1100, 150 + 38 * inputs.loads.layers.len().max(1) as u32),
            Chart::ImbalanceOverTime => (1100, 520),
            Chart::WorkerLoadHistogram => (1100, 70 + 230 * inputs.placements.len().max(1) as u32),
        }
    }

    fn draw<DB: DrawingBackend>(self, root: &DrawingArea<DB, Shift>, inputs: &Inputs<'_>) -> Result<(), PlotError> {
        match self {
            Chart::ExpertLoad => draw_heatmap(root, inputs.loads),
            Chart::ImbalanceOverTime => draw_imbalance_over_time(root, inputs.placements, inputs.min_step_tokens),
            Chart::WorkerLoadHistogram => draw_histograms(root, inputs.placements, inputs.min_step_tokens),
        }
    }
}

/// A drawing failure of either backend, as this crate's error.
fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Draws `chart` into `STEM.png` and `STEM.svg` under `dir`.
fn render(dir: &Path, chart: Chart, inputs: &Inputs<'_>) -> Result<[PathBuf; 2], PlotError> {
    let (w, h) = chart.size(inputs);
    let png = dir.join(format!("{}.png", chart.file_stem()));
    let svg = dir.join(format!("{}.svg", chart.file_stem()));
    let mut pixels = vec![255u8; w as usize * h as usize * 3];
    {
        let glyphs = ab_glyph::FontRef::try_from_slice(FONT).map_err(|_| PlotError::Font)?;
        let bitmap = BitMapBackend::with_buffer(&mut pixels, (w, h));
        let root = text::GlyphText { inner: bitmap, font: glyphs }.into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        chart.draw(&root, inputs)?;
        root.present().map_err(draw_err)?;
    }
    image::save_buffer_with_format(&png, &pixels, w, h, image::ExtendedColorType::Rgb8, image::ImageFormat::Png)
        .map_err(|e| PlotError::Encode { path: png.clone(), reason: e.to_string() })?;
    {
        let root = SVGBackend::new(&svg, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        chart.draw(&root, inputs)?;
        root.present().map_err(draw_err)?;
    }
    Ok([png, svg])
}

fn font(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&BLACK)
}

/// A sequential colour scale from near white (0) to dark blue (1), perceptually even enough for
/// reading shares off a heatmap; black or white text stays legible on every step of it.
fn heat(x: f64) -> RGBColor {
    const STOPS: [(f64, (f64, f64, f64)); 5] = [
        (0.0, (247.0, 251.0, 255.0)),
        (0.25, (198.0, 219.0, 239.0)),
        (0.5, (107.0, 174.0, 214.0)),
        (0.75, (33.0, 113.0, 181.0)),
        (1.0, (8.0, 48.0, 107.0)),
    ];
    let x = x.clamp(0.0, 1.0);
    let i = STOPS.iter().position(|(s, _)| *s >= x).unwrap_or(STOPS.len() - 1).max(1);
    let ((s0, a), (s1, b)) = (STOPS[i - 1], STOPS[i]);
    let t = if s1 > s0 { (x - s0) / (s1 - s0) } else { 0.0 };
    let mix = |p: f64, q: f64| (p + (q - p) * t).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Each layer's routed-token shares per expert, with a colour bar.
fn draw_heatmap<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, loads: &LoadMatrix) -> Result<(), PlotError> {
    let experts = loads.loads.first().map_or(0, Vec::len);
    let layers = loads.layers.len();
    if layers == 0 || experts == 0 {
        return Err(PlotError::Draw("the trace has no MoE layer or no expert to chart".into()));
    }
    let shares: Vec<Vec<f64>> = loads
        .loads
        .iter()
        .map(|row| {
            let total: f64 = row.iter().sum();
            row.iter().map(|l| if total > 0.0 { l / total } else { 0.0 }).collect()
        })
        .collect();
    let top = shares.iter().flatten().copied().fold(0.0, f64::max).max(1e-9);
    let root =
        root.titled("Expert load per MoE layer: share of the layer's routed tokens (%)", font(24)).map_err(draw_err)?;
    let (main, bar) = root.split_horizontally(root.dim_in_pixel().0.saturating_sub(110));
    let mut chart = ChartBuilder::on(&main)
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5..experts as f64 - 0.5, -0.5..layers as f64 - 0.5)
        .map_err(draw_err)?;
    // Rows top to bottom in trace order: the first MoE layer at the top.
    let row_of = |i: usize| (layers - 1 - i) as f64;
    let layer_label = |y: &f64| {
        let i = layers as f64 - 1.0 - y.round();
        if (y - y.round()).abs() < 1e-6 && i >= 0.0 && (i as usize) < layers {
            format!("layer {}", loads.layers[i as usize])
        } else {
            String::new()
        }
    };
    let expert_label =
        |x: &f64| if (x - x.round()).abs() < 1e-6 { format!("{}", x.round() as i64) } else { String::new() };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(experts)
        .y_labels(layers)
        .x_label_formatter(&expert_label)
        .y_label_formatter(&layer_label)
        .x_desc("expert id")
        .label_style(font(15))
        .axis_desc_style(font(17))
        .draw()
        .map_err(draw_err)?;
    let cells = shares.iter().enumerate().flat_map(|(i, row)| {
        row.iter().enumerate().map(move |(e, &s)| {
            let (x, y) = (e as f64, row_of(i));
            Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], heat(s / top).filled())
        })
    });
    chart.draw_series(cells).map_err(draw_err)?;
    let labels = shares.iter().enumerate().flat_map(|(i, row)| {
        row.iter().enumerate().map(move |(e, &s)| {
            let ink: &RGBColor = if s / top > 0.55 { &WHITE } else { &BLACK };
            let style = font(14).color(ink).pos(Pos::new(HPos::Center, VPos::Center));
            Text::new(format!("{:.0}", s * 100.0), (e as f64, row_of(i)), style)
        })
    });
    chart.draw_series(labels).map_err(draw_err)?;

    // Colour bar: share 0 … the hottest cell.
    let mut scale = ChartBuilder::on(&bar)
        .margin_top(10)
        .margin_bottom(55)
        .margin_right(50)
        .y_label_area_size(0)
        .right_y_label_area_size(45)
        .build_cartesian_2d(0.0..1.0, 0.0..top * 100.0)
        .map_err(draw_err)?;
    scale
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.0}%"))
        .label_style(font(14))
        .draw()
        .map_err(draw_err)?;
    let steps = 100;
    scale
        .draw_series((0..steps).map(|k| {
            let (a, b) = (k as f64 / steps as f64, (k + 1) as f64 / steps as f64);
            Rectangle::new([(0.0, a * top * 100.0), (1.0, b * top * 100.0)], heat(a).filled())
        }))
        .map_err(draw_err)?;
    Ok(())
}

/// The steps a per-step chart shows: those of at least `min_step_tokens` tokens (all when none
/// is), as `(index among steps with tokens, imbalance)`; and whether the filter applied.
fn shown_steps(replay: &StepReplay, min_step_tokens: u32) -> (Vec<(f64, f64)>, bool) {
    let all = || replay.imbalance.iter().enumerate().map(|(i, &(t, v))| (i, t, v));
    let big: Vec<(f64, f64)> = all().filter(|&(_, t, _)| t >= min_step_tokens).map(|(i, _, v)| (i as f64, v)).collect();
    if big.is_empty() { (all().map(|(i, _, v)| (i as f64, v)).collect(), false) } else { (big, true) }
}

/// Most points a line of the imbalance chart has: longer traces are shown as means of consecutive
/// steps, so that an SVG of a million-step trace stays small.
const MAX_POINTS: usize = 2000;

/// `points` in consecutive groups of `group`, each as its mean position and value.
fn decimate(points: &[(f64, f64)], group: usize) -> Vec<(f64, f64)> {
    points
        .chunks(group.max(1))
        .map(|c| {
            let n = c.len() as f64;
            (c.iter().map(|p| p.0).sum::<f64>() / n, c.iter().map(|p| p.1).sum::<f64>() / n)
        })
        .collect()
}

/// Per-step imbalance in trace order, one series per placement, with a line at perfect balance.
fn draw_imbalance_over_time<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    placements: &[PlottedPlacement<'_>],
    min_step_tokens: u32,
) -> Result<(), PlotError> {
    let series: Vec<(Vec<(f64, f64)>, bool)> =
        placements.iter().map(|p| shown_steps(p.replay, min_step_tokens)).collect();
    let filtered = series.iter().any(|(_, f)| *f);
    let group = series.iter().map(|(s, _)| s.len()).max().unwrap_or(0).div_ceil(MAX_POINTS).max(1);
    let x_desc = if group > 1 {
        format!("step (trace order; each point the mean of {group} steps)")
    } else {
        "step (trace order)".to_owned()
    };
    let steps = placements.iter().map(|p| p.replay.imbalance.len()).max().unwrap_or(0).max(2);
    let high = series.iter().flat_map(|(s, _)| s.iter().map(|p| p.1)).fold(1.0, f64::max);
    // A third of the height above the highest step, for the legend.
    let top = (high + (high - 0.95) * 0.5).max(1.2);
    let caption = if filtered {
        format!("Per-step worker-load imbalance (steps of ≥ {min_step_tokens} tokens)")
    } else {
        "Per-step worker-load imbalance (every step)".to_owned()
    };
    let mut chart = ChartBuilder::on(root)
        .caption(caption, font(24))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..(steps - 1) as f64, 0.95..top)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .max_light_lines(1)
        .light_line_style(RGBColor(245, 245, 245))
        .bold_line_style(RGBColor(220, 220, 220))
        .x_desc(x_desc)
        .y_desc("max / mean worker load (summed over layers)")
        .y_label_formatter(&|v| format!("{v:.2}"))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(font(15))
        .axis_desc_style(font(17))
        .draw()
        .map_err(draw_err)?;
    chart
        .draw_series(DashedLineSeries::new([(0.0, 1.0), ((steps - 1) as f64, 1.0)], 6, 4, BLACK.mix(0.6).into()))
        .map_err(draw_err)?
        .label("1.0: every worker equally loaded")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.6)));
    for (i, (p, (points, _))) in placements.iter().zip(&series).enumerate() {
        let c = colour(i);
        let mean = points.iter().map(|q| q.1).sum::<f64>() / points.len().max(1) as f64;
        let shown = decimate(points, group);
        // A dot per step, and lines only between neighbouring steps: a line across steps left
        // out (too few tokens) would draw values no step had.
        chart
            .draw_series(shown.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(draw_err)?
            .label(format!("{} (mean {mean:.3})", p.name))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
        for run in shown.chunk_by(|a, b| group > 1 || b.0 - a.0 <= 1.0 + 1e-9) {
            chart.draw_series(LineSeries::new(run.iter().copied(), c.stroke_width(2))).map_err(draw_err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font(font(15))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Per placement, the distribution of worker loads relative to their (step, layer) mean.
fn draw_histograms<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    placements: &[PlottedPlacement<'_>],
    min_step_tokens: u32,
) -> Result<(), PlotError> {
    let caption =
        format!("Worker loads ÷ the mean worker load of their (step, layer), steps of ≥ {min_step_tokens} tokens");
    let root = root.titled(&caption, font(22)).map_err(draw_err)?;
    let panels = root.split_evenly((placements.len().max(1), 1));
    let shares: Vec<Vec<f64>> = placements
        .iter()
        .map(|p| {
            let total = p.replay.histogram.iter().sum::<u64>().max(1) as f64;
            p.replay.histogram.iter().map(|&n| n as f64 * 100.0 / total).collect()
        })
        .collect();
    // One y scale for every panel, so their heights compare.
    let high = shares.iter().flatten().copied().fold(1.0, f64::max) * 1.1;
    let right = HISTOGRAM_BINS as f64 * HISTOGRAM_BIN_WIDTH;
    for (i, ((p, share), panel)) in placements.iter().zip(&shares).zip(&panels).enumerate() {
        let c = colour(i);
        let samples: u64 = p.replay.histogram.iter().sum();
        let above = |x: f64| -> f64 {
            let from = (x / HISTOGRAM_BIN_WIDTH).round() as usize;
            share.iter().skip(from).sum()
        };
        let title = format!(
            "{}: {samples} worker loads, {:.1}% at ≥ 1.2× the mean, {:.1}% at ≥ 1.5×",
            p.name,
            above(1.2),
            above(1.5)
        );
        let last = i + 1 == placements.len();
        let mut chart = ChartBuilder::on(panel)
            .caption(title, font(17))
            .margin_left(15)
            .margin_right(25)
            .margin_bottom(if last { 5 } else { 12 })
            .x_label_area_size(if last { 45 } else { 22 })
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..right, 0.0..high)
            .map_err(draw_err)?;
        let x_label = |v: &f64| {
            let last = right - HISTOGRAM_BIN_WIDTH;
            if *v >= last - 1e-9 { format!("≥{last:.1}") } else { format!("{v:.1}") }
        };
        let y_label = |v: &f64| format!("{v:.0}");
        let mut mesh = chart.configure_mesh();
        mesh.max_light_lines(1)
            .light_line_style(RGBColor(245, 245, 245))
            .bold_line_style(RGBColor(225, 225, 225))
            .y_desc("% of loads")
            .x_labels(16)
            .x_label_formatter(&x_label)
            .y_label_formatter(&y_label)
            .label_style(font(14))
            .axis_desc_style(font(15));
        if last {
            mesh.x_desc("worker load ÷ mean worker load (1.0 = even; the last bar holds all ≥ 3.0)");
        }
        mesh.draw().map_err(draw_err)?;
        chart
            .draw_series(share.iter().enumerate().map(|(b, &s)| {
                let x = b as f64 * HISTOGRAM_BIN_WIDTH;
                Rectangle::new([(x + 0.005, 0.0), (x + HISTOGRAM_BIN_WIDTH - 0.005, s)], c.mix(0.8).filled())
            }))
            .map_err(draw_err)?;
        chart
            .draw_series(DashedLineSeries::new([(1.0, 0.0), (1.0, high)], 6, 4, BLACK.mix(0.6).into()))
            .map_err(draw_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{CostModel, Resolved};
    use crate::{StepLoads, plan};

    #[test]
    fn charts_are_written_as_png_and_svg() {
        let layers = [0u32, 1];
        let workers: Vec<String> = (0..2).map(|i| format!("w{i}")).collect();
        let placement = plan::contiguous(&layers, 4, &workers).expect("contiguous");
        let resolved = Resolved::new(&layers, 4, &placement).expect("resolves");
        let mut replay = StepReplay::new(resolved, CostModel::default(), 8);
        let mut loads = LoadMatrix::zeros(&layers, 4);
        for s in 0..20u32 {
            let counts = vec![vec![6 + s % 3, 2, 1, 1], vec![1, 1, 2, 6]];
            let step = StepLoads { timestamp_us: u64::from(s), tokens: 10, counts };
            loads.add_step(&step);
            replay.observe(&step);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write_plots(dir.path(), &loads, &[PlottedPlacement { name: "contiguous", replay: &replay }], 8)
            .expect("plots");
        assert_eq!(written.len(), 6);
        for path in &written {
            let bytes = std::fs::read(path).expect("written");
            assert!(bytes.len() > 2000, "{} is {} bytes", path.display(), bytes.len());
            if path.extension().is_some_and(|e| e == "png") {
                let img = image::load_from_memory(&bytes).expect("a PNG").to_rgb8();
                // Not a blank canvas: a good part of the pixels is ink.
                let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
                assert!(inked * 50 > img.pixels().len(), "{}: {inked} inked pixels", path.display());
            } else {
                let svg = String::from_utf8(bytes).expect("utf-8");
                assert!(svg.starts_with("<svg"), "{}", path.display());
                // The per-placement charts name the placement (the heatmap does not depend on it).
                let per_placement = !path.ends_with("expert-load.svg");
                assert_eq!(svg.contains("contiguous"), per_placement, "{}", path.display());
            }
        }
    }

    #[test]
    fn long_lines_are_shown_as_means_of_consecutive_steps() {
        let points: Vec<(f64, f64)> = (0..5).map(|i| (f64::from(i), f64::from(i * 2))).collect();
        assert_eq!(decimate(&points, 2), [(0.5, 1.0), (2.5, 5.0), (4.0, 8.0)]);
        assert_eq!(decimate(&points, 1), points);
    }

    #[test]
    fn heat_scale_runs_light_to_dark() {
        let luminance = |c: RGBColor| u32::from(c.0) + u32::from(c.1) + u32::from(c.2);
        let steps: Vec<u32> = (0..=10).map(|i| luminance(heat(f64::from(i) / 10.0))).collect();
        assert!(steps.windows(2).all(|w| w[0] > w[1]), "{steps:?}");
    }
}
