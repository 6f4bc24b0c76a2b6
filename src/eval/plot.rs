//! PNG plots of evaluation results: a confusion-matrix heat map and training curves.
//!
//! Both functions render to a temporary file next to the destination and rename it into
//! place, so a reader (or a crashed run) never sees a half-written PNG, and re-running
//! an evaluation replaces the old plot in one step.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::metrics::{truncate, ClassificationReport};

/// Pixel size (width, height) of [`plot_confusion`] images. Fixed rather than derived
/// from the class count so reports from different runs line up side by side.
pub const CONFUSION_PNG_SIZE: (u32, u32) = (1100, 1000);
/// Pixel size (width, height) of [`plot_training_curves`] images.
pub const CURVES_PNG_SIZE: (u32, u32) = (1400, 560);

const FONT: &str = "sans-serif";
/// Class names longer than this are cut so one long name cannot squeeze the grid.
const MAX_LABEL_CHARS: usize = 26;
const TEXT: RGBColor = RGBColor(30, 30, 30);
const MUTED: RGBColor = RGBColor(150, 150, 150);
// Tableau colours: distinguishable for the common forms of colour blindness.
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VAL_COLOR: RGBColor = RGBColor(255, 127, 14);
const ACC_COLOR: RGBColor = RGBColor(44, 160, 44);

/// One logged point of a training run. `epoch` may be fractional (train loss is usually
/// logged several times per epoch, validation once). `val_accuracy` is a fraction in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurvePoint {
    pub epoch: f64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
}

/// Renders through `render` into a temporary `.png` in `path`'s directory, then renames
/// it to `path`. The temporary name must end in `.png` because the bitmap backend picks
/// the encoder from the extension; the rename keeps the write atomic.
fn write_atomically(
    path: &Path,
    render: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    crate::artifacts::write_atomic_path(path, ".png", |tmp| {
        render(tmp).with_context(|| format!("cannot render plot {}", path.display()))
    })
}

/// Plotters' errors carry the backend type; flatten them into `anyhow` at the boundary.
fn draw_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    anyhow!(e)
}

fn font(size: f64) -> TextStyle<'static> {
    (FONT, size).into_font().color(&TEXT)
}

/// Matplotlib's sequential "Blues" map at `t` in [0, 1]: light for small values so the
/// dark diagonal of a good classifier stands out.
fn blues(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (247, 251, 255),
        (222, 235, 247),
        (198, 219, 239),
        (158, 202, 225),
        (107, 174, 214),
        (66, 146, 198),
        (33, 113, 181),
        (8, 81, 156),
        (8, 48, 107),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let lerp = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

/// Writes `report`'s confusion matrix as a PNG heat map of [`CONFUSION_PNG_SIZE`]:
/// rows are true classes, columns predicted classes. With `normalize`, each row is
/// divided by its support (so the diagonal shows per-class recall and small classes are
/// as visible as large ones); otherwise raw counts are shown. Every cell carries its value
/// unless cells get too small for text (roughly beyond 30 classes).
pub fn plot_confusion(
    report: &ClassificationReport,
    path: &Path,
    normalize: bool,
) -> anyhow::Result<()> {
    write_atomically(path, |tmp| {
        let root = BitMapBackend::new(tmp, CONFUSION_PNG_SIZE).into_drawing_area();
        draw_confusion(&root, report, normalize)?;
        root.present().map_err(draw_err)?;
        Ok(())
    })
}

fn draw_confusion<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &ClassificationReport,
    normalize: bool,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (width, height) = CONFUSION_PNG_SIZE;
    let (width, height) = (width as i32, height as i32);
    root.fill(&WHITE).map_err(draw_err)?;

    let k = report.labels.len();
    let counts: Vec<Vec<f64>> = report
        .confusion
        .iter()
        .map(|row| row.iter().map(|&c| c as f64).collect())
        .collect();
    let values = if normalize {
        report.confusion_normalized()
    } else {
        counts
    };
    // Colour scale maximum: 1 for fractions; the largest cell for counts.
    let vmax = if normalize {
        1.0
    } else {
        values
            .iter()
            .flatten()
            .copied()
            .fold(0.0, f64::max)
            .max(1.0)
    };

    // Title and a one-line summary of the headline metrics.
    let title = if normalize {
        "Confusion matrix (row-normalised)"
    } else {
        "Confusion matrix (counts)"
    };
    let center = Pos::new(HPos::Center, VPos::Center);
    root.draw_text(title, &font(26.0).pos(center), (width / 2, 24))
        .map_err(draw_err)?;
    let summary = format!(
        "{} {:.1}%    MCC {:.3}    macro-F1 {:.3}    n = {}",
        report.accuracy_name(),
        100.0 * report.accuracy,
        report.mcc,
        report.macro_f1,
        report.n
    );
    root.draw_text(&summary, &font(18.0).pos(center), (width / 2, 56))
        .map_err(draw_err)?;

    // Row labels carry the support so normalised rows can be read back as counts.
    // Class names shrink with the class count so neighbouring rows never overlap
    // (~700 px of grid shared by k rows; names take about half a row).
    let label_font = font((385.0 / k.max(1) as f64).clamp(8.0, 15.0));
    let row_labels: Vec<String> = report
        .per_class
        .iter()
        .map(|c| format!("{} ({})", truncate(&c.label, MAX_LABEL_CHARS), c.support))
        .collect();
    let text_width = |s: &str| -> anyhow::Result<i32> {
        Ok(root.estimate_text_size(s, &label_font).map_err(draw_err)?.0 as i32)
    };
    let mut row_w = 0;
    for s in &row_labels {
        row_w = row_w.max(text_width(s)?);
    }
    let col_labels: Vec<String> = report
        .labels
        .iter()
        .map(|l| truncate(l, MAX_LABEL_CHARS))
        .collect();
    let mut col_w = 0;
    for s in &col_labels {
        col_w = col_w.max(text_width(s)?);
    }

    // Layout: axis title | row labels | grid | colour bar, with rotated column labels
    // and the x-axis title below the grid. Cells are square and as large as fits.
    let (top, axis_title, gap, right) = (84, 36, 10, 140);
    let left = axis_title + row_w + gap;
    let bottom = col_w + gap + axis_title;
    let cell = if k == 0 {
        0
    } else {
        ((width - left - right) / k as i32)
            .min((height - top - bottom) / k as i32)
            .max(1)
    };
    let grid = cell * k as i32;
    let (x0, y0) = (left, top);

    let cell_font_size = (cell as f64 * 0.38).clamp(9.0, 18.0);
    // Below this a value such as "0.81" no longer fits its cell; the colour has to do.
    let show_values = cell >= 24;
    for (i, row) in values.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let t = v / vmax;
            let (cx, cy) = (x0 + j as i32 * cell, y0 + i as i32 * cell);
            root.draw(&Rectangle::new(
                [(cx, cy), (cx + cell, cy + cell)],
                blues(t).filled(),
            ))
            .map_err(draw_err)?;
            // Zeros are the bulk of a good confusion matrix: draw them quietly.
            let (text, color) = if report.confusion[i][j] == 0 {
                ("0".to_string(), MUTED)
            } else if normalize {
                (format!("{v:.2}"), if t > 0.5 { WHITE } else { TEXT })
            } else {
                (format!("{v:.0}"), if t > 0.5 { WHITE } else { TEXT })
            };
            if show_values {
                let style = (FONT, cell_font_size).into_font().color(&color).pos(center);
                root.draw_text(&text, &style, (cx + cell / 2, cy + cell / 2))
                    .map_err(draw_err)?;
            }
        }
    }
    // Thin grid lines and a frame keep neighbouring pale cells apart.
    let line = RGBColor(200, 200, 200).stroke_width(1);
    for i in 0..=k as i32 {
        let p = i * cell;
        root.draw(&PathElement::new(
            vec![(x0, y0 + p), (x0 + grid, y0 + p)],
            line,
        ))
        .map_err(draw_err)?;
        root.draw(&PathElement::new(
            vec![(x0 + p, y0), (x0 + p, y0 + grid)],
            line,
        ))
        .map_err(draw_err)?;
    }

    // Row labels right-aligned against the grid; column labels rotated to read upwards,
    // ending just under their column.
    let row_style = label_font.pos(Pos::new(HPos::Right, VPos::Center));
    let col_style = label_font
        .transform(FontTransform::Rotate270)
        .pos(Pos::new(HPos::Right, VPos::Center));
    for (i, s) in row_labels.iter().enumerate() {
        let y = y0 + i as i32 * cell + cell / 2;
        root.draw_text(s, &row_style, (x0 - gap, y))
            .map_err(draw_err)?;
    }
    for (j, s) in col_labels.iter().enumerate() {
        let x = x0 + j as i32 * cell + cell / 2;
        root.draw_text(s, &col_style, (x, y0 + grid + gap))
            .map_err(draw_err)?;
    }
    let axis_font = font(18.0);
    root.draw_text(
        "Predicted class",
        &axis_font.pos(center),
        (x0 + grid / 2, y0 + grid + gap + col_w + axis_title / 2),
    )
    .map_err(draw_err)?;
    root.draw_text(
        "True class (support)",
        &axis_font.transform(FontTransform::Rotate270).pos(center),
        (axis_title / 2, y0 + grid / 2),
    )
    .map_err(draw_err)?;

    draw_color_bar(root, (x0 + grid + 30, y0), grid, vmax, normalize)
}

/// Vertical colour bar of height `len` at `origin`, with five ticks from 0 to `vmax`.
fn draw_color_bar<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
    len: i32,
    vmax: f64,
    normalize: bool,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    if len <= 0 {
        return Ok(());
    }
    let bar_w = 24;
    for dy in 0..len {
        // Top of the bar is the maximum, like the y axis of an ordinary plot.
        let t = 1.0 - dy as f64 / (len - 1).max(1) as f64;
        root.draw(&Rectangle::new(
            [(x, y + dy), (x + bar_w, y + dy + 1)],
            blues(t).filled(),
        ))
        .map_err(draw_err)?;
    }
    root.draw(&Rectangle::new(
        [(x, y), (x + bar_w, y + len)],
        RGBColor(120, 120, 120).stroke_width(1),
    ))
    .map_err(draw_err)?;
    let tick_style = font(14.0).pos(Pos::new(HPos::Left, VPos::Center));
    for step in 0..=4 {
        let frac = step as f64 / 4.0;
        let ty = y + len - 1 - ((len - 1) as f64 * frac).round() as i32;
        let v = vmax * frac;
        let label = if normalize {
            format!("{v:.2}")
        } else if vmax >= 4.0 {
            format!("{:.0}", v.round())
        } else {
            format!("{v:.1}")
        };
        root.draw(&PathElement::new(
            vec![(x + bar_w, ty), (x + bar_w + 5, ty)],
            RGBColor(120, 120, 120),
        ))
        .map_err(draw_err)?;
        root.draw_text(&label, &tick_style, (x + bar_w + 8, ty))
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Writes training curves as a PNG of [`CURVES_PNG_SIZE`] with two panels: train and
/// validation loss (left), validation accuracy in percent (right). Missing or non-finite
/// values are skipped, so points may carry any subset of the three quantities; points
/// are plotted in epoch order whatever order they are given in.
pub fn plot_training_curves(points: &[CurvePoint], path: &Path) -> anyhow::Result<()> {
    write_atomically(path, |tmp| {
        let root = BitMapBackend::new(tmp, CURVES_PNG_SIZE).into_drawing_area();
        draw_curves(&root, points)?;
        root.present().map_err(draw_err)?;
        Ok(())
    })
}

/// The finite `(epoch, value)` pairs selected by `get`, sorted by epoch.
fn series(points: &[CurvePoint], get: impl Fn(&CurvePoint) -> Option<f64>) -> Vec<(f64, f64)> {
    let mut s: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| get(p).map(|v| (p.epoch, v)))
        .filter(|(e, v)| e.is_finite() && v.is_finite())
        .collect();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    s
}

/// A non-degenerate axis range covering `values` (or `fallback` when there are none).
fn padded_range(values: impl Iterator<Item = f64>, fallback: (f64, f64)) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        fallback
    } else if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

fn draw_curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    points: &[CurvePoint],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(draw_err)?;
    let (left, right) = root.split_horizontally(CURVES_PNG_SIZE.0 / 2);

    let train = series(points, |p| p.train_loss);
    let val = series(points, |p| p.val_loss);
    let acc: Vec<(f64, f64)> = series(points, |p| p.val_accuracy)
        .into_iter()
        .map(|(e, a)| (e, 100.0 * a))
        .collect();

    // Both panels share the epoch axis so they can be read against each other.
    let epochs = train.iter().chain(&val).chain(&acc).map(|p| p.0);
    let (e_lo, e_hi) = padded_range(epochs.chain([0.0]), (0.0, 1.0));
    // A little room on the right so the last point's marker is not clipped by the frame.
    let e_hi = e_hi + 0.03 * (e_hi - e_lo);

    // Loss: cross-entropy is non-negative, so start at 0 to keep the scale honest.
    let loss_max = train.iter().chain(&val).map(|p| p.1).fold(0.0, f64::max);
    // The headroom above the largest loss keeps the upper-right legend off the data.
    let loss_hi = if loss_max > 0.0 { loss_max * 1.3 } else { 1.0 };
    {
        let y_axis = ("loss", 0.0..loss_hi, fmt_loss_tick as fn(&f64) -> String);
        let mut chart = epoch_chart(&left, "Loss", e_lo..e_hi, y_axis)?;
        // Dense per-step train losses read best as a plain line; sparse ones get markers.
        let train_marker = if train.len() <= 30 { 3 } else { 0 };
        draw_line(&mut chart, &train, TRAIN_COLOR, train_marker, "train loss")?;
        draw_line(&mut chart, &val, VAL_COLOR, 4, "validation loss")?;
        if let Some(&(e, l)) = val.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
            chart
                .draw_series([Circle::new((e, l), 7, VAL_COLOR.stroke_width(2))])
                .map_err(draw_err)?
                .label(format!("best val loss {l:.3} @ epoch {}", fmt_epoch(e)))
                .legend(|(x, y)| Circle::new((x + 12, y), 6, VAL_COLOR.stroke_width(2)));
        }
        if train.is_empty() && val.is_empty() {
            draw_no_data(&left, "no loss recorded")?;
        } else {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
    }

    // Accuracy in percent, zoomed to the data but rounded out to multiples of 10.
    let (a_lo, a_hi) = padded_range(acc.iter().map(|p| p.1), (0.0, 100.0));
    let a_lo = (((a_lo - 5.0) / 10.0).floor() * 10.0).max(0.0);
    let a_hi = (((a_hi + 5.0) / 10.0).ceil() * 10.0)
        .min(100.0)
        .max(a_lo + 10.0);
    {
        let y_axis = (
            "accuracy (%)",
            a_lo..a_hi,
            fmt_percent_tick as fn(&f64) -> String,
        );
        let mut chart = epoch_chart(&right, "Validation accuracy", e_lo..e_hi, y_axis)?;
        draw_line(&mut chart, &acc, ACC_COLOR, 4, "validation accuracy")?;
        // Ring the best epoch: that is the checkpoint one would keep.
        if let Some(&(e, a)) = acc.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
            chart
                .draw_series([Circle::new((e, a), 7, ACC_COLOR.stroke_width(2))])
                .map_err(draw_err)?
                .label(format!("best {a:.1}% @ epoch {}", fmt_epoch(e)))
                .legend(|(x, y)| Circle::new((x + 12, y), 6, ACC_COLOR.stroke_width(2)));
        }
        if acc.is_empty() {
            draw_no_data(&right, "no validation accuracy recorded")?;
        } else {
            draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        }
    }
    Ok(())
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws `data` as a line (with markers of radius `marker`, 0 for none) and registers it
/// in the legend. Empty series are skipped so the legend lists only what is drawn.
fn draw_line<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    data: &[(f64, f64)],
    color: RGBColor,
    marker: u32,
    label: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    if data.is_empty() {
        return Ok(());
    }
    let style = color.stroke_width(2);
    chart
        .draw_series(LineSeries::new(data.iter().copied(), style).point_size(marker))
        .map_err(draw_err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    Ok(())
}

/// A chart over epochs on `area` with its caption, grid and axes: the y axis's
/// (description, range, tick format).
fn epoch_chart<'a, DB: DrawingBackend + 'a>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    epochs: std::ops::Range<f64>,
    (y_desc, y_range, y_ticks): (&str, std::ops::Range<f64>, fn(&f64) -> String),
) -> anyhow::Result<Chart<'a, DB>>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, font(24.0))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(64)
        .build_cartesian_2d(epochs, y_range)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_label_formatter(&fmt_epoch_tick)
        .y_label_formatter(&y_ticks)
        .axis_desc_style(font(18.0))
        .label_style(font(14.0))
        .max_light_lines(4)
        .light_line_style(RGBColor(244, 244, 244))
        .draw()
        .map_err(draw_err)?;
    Ok(chart)
}

fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font(font(15.0))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Epoch axis ticks: whole epochs without a decimal point, fractions with as few as needed.
fn fmt_epoch_tick(e: &f64) -> String {
    let s = format!("{e:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn fmt_loss_tick(l: &f64) -> String {
    let s = format!("{l:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn fmt_percent_tick(a: &f64) -> String {
    format!("{a:.0}")
}

/// Epochs are usually whole numbers; don't print "3.00" for them.
fn fmt_epoch(e: f64) -> String {
    if e.fract() == 0.0 {
        format!("{e:.0}")
    } else {
        format!("{e:.2}")
    }
}

/// A grey note in the middle of an empty panel, so a blank plot is not mistaken for a bug.
fn draw_no_data<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, msg: &str) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let style = (FONT, 20.0)
        .into_font()
        .color(&MUTED)
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw_text(msg, &style, (w as i32 / 2, h as i32 / 2))
        .map_err(draw_err)?;
    Ok(())
}

/// Size of the per-class F1 bar chart.
pub const F1_PNG_SIZE: (u32, u32) = (900, 520);

/// Writes a horizontal bar chart of per-class F1 (with each class's support), sorted as in
/// the report, so rare classes that the model never gets right stand out.
pub fn plot_per_class_f1(report: &ClassificationReport, path: &Path) -> anyhow::Result<()> {
    write_atomically(path, |tmp| {
        let root = BitMapBackend::new(tmp, F1_PNG_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let n = report.per_class.len();
        if n == 0 {
            return draw_no_data(&root, "no classes");
        }
        let names: Vec<String> = report
            .per_class
            .iter()
            .map(|c| truncate(&c.label, MAX_LABEL_CHARS))
            .collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Per-class F1 (accuracy {:.1}%, MCC {:.3}, macro-F1 {:.3})",
                    report.accuracy * 100.0,
                    report.mcc,
                    report.macro_f1
                ),
                font(20.0),
            )
            .margin(16)
            .x_label_area_size(36)
            .y_label_area_size(190)
            .build_cartesian_2d(0f64..1.0f64, 0f64..n as f64)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|y| {
                let i = (n as f64 - y - 0.5).round();
                if i >= 0.0 && (i as usize) < n && (y.fract() - 0.5).abs() < 1e-6 {
                    names[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .x_desc("F1")
            .label_style(font(14.0))
            .draw()
            .map_err(draw_err)?;
        // Class i is drawn top to bottom: its bar spans y in [n-1-i+0.15, n-i-0.15].
        for (i, c) in report.per_class.iter().enumerate() {
            let top = (n - i) as f64 - 0.15;
            let bottom = (n - 1 - i) as f64 + 0.15;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, bottom), (c.f1.clamp(0.0, 1.0), top)],
                    TRAIN_COLOR.filled(),
                )))
                .map_err(draw_err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{:.2}  (n={})", c.f1, c.support),
                    ((c.f1 + 0.01).min(0.8), (n - 1 - i) as f64 + 0.65),
                    font(13.0),
                )))
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blues_endpoints_and_clamping() {
        assert_eq!(blues(0.0), RGBColor(247, 251, 255));
        assert_eq!(blues(1.0), RGBColor(8, 48, 107));
        assert_eq!(blues(-3.0), blues(0.0));
        assert_eq!(blues(7.0), blues(1.0));
        assert_eq!(blues(f64::NAN), blues(0.0));
    }

    #[test]
    fn padded_range_never_degenerate() {
        assert_eq!(padded_range([].into_iter(), (0.0, 1.0)), (0.0, 1.0));
        assert_eq!(padded_range([2.0].into_iter(), (0.0, 1.0)), (1.5, 2.5));
        assert_eq!(padded_range([3.0, 1.0].into_iter(), (0.0, 1.0)), (1.0, 3.0));
    }

    #[test]
    fn series_sorts_and_drops_non_finite() {
        let p = |epoch, l| CurvePoint {
            epoch,
            train_loss: l,
            val_loss: None,
            val_accuracy: None,
        };
        let pts = [
            p(2.0, Some(1.0)),
            p(1.0, Some(2.0)),
            p(3.0, Some(f64::NAN)),
            p(4.0, None),
        ];
        assert_eq!(series(&pts, |p| p.train_loss), vec![(1.0, 2.0), (2.0, 1.0)]);
    }

    #[test]
    fn fmt_epoch_whole_and_fractional() {
        assert_eq!(fmt_epoch(3.0), "3");
        assert_eq!(fmt_epoch(2.25), "2.25");
    }
}
