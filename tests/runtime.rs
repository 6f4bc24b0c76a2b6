//! Start-up tuning: candle's element-wise pool must park instead of spinning (it steals a
//! core from the GEMM threads), unless the user chose otherwise. One test in its own
//! process, because it changes the environment.

use protloc::runtime::{tune_for_tensors, CANDLE_SPIN_VAR as VAR};

#[test]
fn candle_pool_parks_at_once_unless_the_user_set_a_spin_limit() {
    std::env::set_var(VAR, "123");
    tune_for_tensors();
    assert_eq!(
        std::env::var(VAR).as_deref(),
        Ok("123"),
        "a user's setting must win"
    );

    std::env::remove_var(VAR);
    tune_for_tensors();
    assert_eq!(std::env::var(VAR).as_deref(), Ok("0"));
}
