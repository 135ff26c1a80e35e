//! Helpers shared by the executor's integration tests.
#![allow(dead_code)]

/// A small deterministic generator (64-bit LCG), so failures reproduce.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// A 2-D window: kernel (each up to `kmax`), strides, dilations, and pads smaller than the kernel.
    pub fn window2(&mut self, kmax: usize) -> ([usize; 2], [usize; 2], [usize; 2], [usize; 4]) {
        let k = [1 + self.below(kmax), 1 + self.below(kmax)];
        let s = [1 + self.below(3), 1 + self.below(3)];
        let d = [1 + self.below(2), 1 + self.below(2)];
        let p = [
            self.below(k[0]),
            self.below(k[1]),
            self.below(k[0]),
            self.below(k[1]),
        ];
        (k, s, d, p)
    }
    pub fn vals(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.below(2001) as f32 - 1000.0) / 250.0)
            .collect()
    }
}

pub fn dims(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs a model in the IR text format on named inputs and returns its outputs' tensors, in order.
pub fn run_text(src: &str, inputs: Vec<(&str, mpopt_exec::Tensor)>) -> Vec<mpopt_exec::Tensor> {
    let m = mpopt_ir::text::parse_model(src).expect("fixture parses");
    let exec = mpopt_exec::Executor::new(&m).expect("the executor accepts the model");
    let ins = inputs
        .into_iter()
        .map(|(n, t)| (n.to_string(), mpopt_exec::Value::Tensor(t)))
        .collect();
    exec.run(ins, &mpopt_exec::RunOptions::default())
        .expect("the model runs")
        .outputs
        .into_iter()
        .map(|(_, v)| v.tensor().expect("a tensor output").clone())
        .collect()
}

/// Runs a model that must fail (at preparation or when run) and returns the error's text.
pub fn run_text_err(src: &str, inputs: Vec<(&str, mpopt_exec::Tensor)>) -> String {
    let m = mpopt_ir::text::parse_model(src).expect("fixture parses");
    let ins = inputs
        .into_iter()
        .map(|(n, t)| (n.to_string(), mpopt_exec::Value::Tensor(t)))
        .collect();
    match mpopt_exec::Executor::new(&m).and_then(|e| e.run(ins, &mpopt_exec::RunOptions::default()))
    {
        Ok(_) => panic!("the model ran"),
        Err(e) => e.to_string(),
    }
}
