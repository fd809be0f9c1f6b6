package kernels

// Tol is a mixed tolerance: |got−want| ≤ Abs + Rel·|want|.
type Tol struct {
	Abs, Rel float64
}

// Tolerance is one row of the table: the float32 and float64 tolerances of
// an op and why they are what they are.
type Tolerance struct {
	F32, F64 Tol
	Why      string
}

// Tolerances is the single tolerance table of the conformance suite
// (kernels/kerneltest) and of bmojo bench kernels, keyed by op (Op.Method):
// every op of Contract has a row. Backward entries compare against finite
// differences (step fdEps in float64), whose own error is ~1e-9 and bounds
// the float64 rows.
var Tolerances = map[string]Tolerance{
	"Upload":                {Tol{0, 0}, Tol{0, 0}, "a copy is exact"},
	"Download":              {Tol{0, 0}, Tol{0, 0}, "a copy is exact"},
	"UploadInt":             {Tol{0, 0}, Tol{0, 0}, "a copy is exact"},
	"DownloadInt":           {Tol{0, 0}, Tol{0, 0}, "a copy is exact"},
	"Zero":                  {Tol{0, 0}, Tol{0, 0}, "exact"},
	"Copy":                  {Tol{0, 0}, Tol{0, 0}, "exact"},
	"CopyColumns":           {Tol{0, 0}, Tol{0, 0}, "exact"},
	"MatMulAdd":             {Tol{1e-5, 1e-5}, Tol{1e-12, 1e-12}, "MatMul's: dot products of up to 129 terms, one add"},
	"Accumulate":            {Tol{0, 0}, Tol{0, 0}, "one rounded add, reproduced by the reference"},
	"Scale":                 {Tol{0, 1.2e-7}, Tol{0, 2.3e-16}, "one rounding; s may be rounded to F first or not (1 ulp)"},
	"Slice":                 {Tol{0, 0}, Tol{0, 0}, "views and round trips are exact"},
	"SumSquares":            {Tol{0, 1e-12}, Tol{0, 1e-12}, "float64 accumulation; only summation order differs"},
	"Embedding":             {Tol{0, 0}, Tol{0, 0}, "a gather is exact"},
	"EmbeddingBackward":     {Tol{1e-6, 1e-5}, Tol{1e-8, 1e-7}, "finite differences of a linear map; float32 sums of a few terms"},
	"RMSNorm":               {Tol{1e-6, 1e-5}, Tol{1e-13, 1e-12}, "float64 reduction, one float32 rounding of out"},
	"RMSNormBackward":       {Tol{1e-5, 1e-4}, Tol{1e-7, 1e-6}, "finite differences; rstd is stored in F"},
	"MatMul":                {Tol{1e-5, 1e-5}, Tol{1e-12, 1e-12}, "float32 dot products of up to 129 terms"},
	"MatMulBackward":        {Tol{1e-5, 1e-4}, Tol{1e-7, 1e-6}, "finite differences of a bilinear map"},
	"Conv1d":                {Tol{1e-6, 1e-5}, Tol{1e-13, 1e-12}, "float32 sums of K+1 terms"},
	"Conv1dBackward":        {Tol{1e-5, 1e-4}, Tol{1e-7, 1e-6}, "finite differences; float32 accumulation over B·T"},
	"Conv1dSiLU":            {Tol{1e-6, 1e-5}, Tol{1e-13, 1e-12}, "Conv1d's sums of K+1 terms, then SiLU of the rounded out (one more rounding)"},
	"SiLU":                  {Tol{1e-7, 1e-6}, Tol{1e-15, 1e-14}, "float64 math, one float32 rounding"},
	"SiLUBackward":          {Tol{1e-6, 1e-5}, Tol{1e-8, 1e-7}, "finite differences"},
	"SiLUMatMulBackward":    {Tol{1e-5, 1e-4}, Tol{1e-12, 1e-11}, "float32 dot products of up to 80 terms, then SiLUBackward's float64 factor"},
	"SelectiveScan":         {Tol{1e-5, 1e-5}, Tol{1e-12, 1e-11}, "float64 state; error is the float32 rounding of inputs and out"},
	"SelectiveScanBackward": {Tol{1e-4, 1e-3}, Tol{1e-7, 1e-6}, "finite differences through T exponentials and products"},
	"RoPE":                  {Tol{1e-6, 1e-5}, Tol{1e-13, 1e-12}, "float64 angles, one float32 rounding"},
	"RoPEBackward":          {Tol{1e-5, 1e-4}, Tol{1e-7, 1e-6}, "finite differences of a rotation"},
	"Attention":             {Tol{2e-5, 1e-4}, Tol{1e-12, 1e-11}, "float32 dot products; LSE merge vs one softmax differs by rounding only"},
	"AttentionBackward":     {Tol{1e-4, 1e-3}, Tol{1e-7, 1e-6}, "finite differences of softmax; float32 scores and probabilities"},
	"ShiftRows":             {Tol{0, 0}, Tol{0, 0}, "a copy is exact"},
	"Innovation":            {Tol{1e-6, 1e-5}, Tol{1e-13, 1e-12}, "float64 mean of squares, one float32 rounding"},
	"InnovationBackward":    {Tol{1e-5, 1e-4}, Tol{1e-7, 1e-6}, "finite differences of a quadratic"},
	"SelectChunks":          {Tol{0, 0}, Tol{0, 0}, "selection is discrete"},
	"SwiGLU":                {Tol{1e-6, 1e-5}, Tol{1e-14, 1e-13}, "float64 math, one float32 rounding"},
	"SwiGLUBackward":        {Tol{1e-5, 1e-4}, Tol{1e-8, 1e-7}, "finite differences"},
	"SwiGLUPacked":          {Tol{1e-6, 1e-5}, Tol{1e-14, 1e-13}, "SwiGLU's: float64 math, one float32 rounding"},
	"SwiGLUPackedBackward":  {Tol{1e-5, 1e-4}, Tol{1e-8, 1e-7}, "SwiGLUBackward's: finite differences"},
	"CrossEntropy":          {Tol{1e-5, 1e-5}, Tol{1e-12, 1e-12}, "float64 log-sum-exp, one float32 rounding"},
	"CrossEntropyBackward":  {Tol{1e-5, 1e-4}, Tol{1e-7, 1e-6}, "finite differences of log-sum-exp"},
	"AdamWStep":             {Tol{1e-6, 1e-5}, Tol{1e-14, 1e-13}, "float64 update; moments stored in F between steps"},
	"AdamWSteps":            {Tol{1e-6, 1e-5}, Tol{1e-14, 1e-13}, "AdamWStep's, segment by segment"},
}

// BF16Tolerances replace the float32 rows of the attention ops on a backend
// whose attention runs its matrix products on bf16 tensor cores
// (BF16Attention). Its inputs are then drawn bf16-representable, so Q·Kᵀ and
// dO·Vᵀ are exact, but the probabilities P and score gradients dS are
// rounded to bf16 (relative error ≤ 2⁻⁹) as operands of P·V, Pᵀ·dO, dS·K and
// dSᵀ·Q. A wrong fragment index or mask shows up as errors of order 1.
var BF16Tolerances = map[string]Tol{
	"Attention":         {3e-3, 3e-3},
	"AttentionBackward": {1e-2, 1e-2},
}

// BF16MatMul is implemented by backends whose matrix products round their
// inputs to bfloat16 (tensor cores) and accumulate in float32. The
// conformance suite (kernels/kerneltest) then draws matrix-product inputs that bfloat16 represents exactly, so the
// products are exact and the float32 tolerance still holds; the effect of
// the rounding itself is checked at model level (docs/model.md §5).
type BF16MatMul interface{ MatMulBF16() bool }

// BF16Attention is implemented by backends whose attention rounds the
// operands of its matrix products to bfloat16 and accumulates in float32
// (flash-attention on tensor cores). The suite then draws attention inputs
// that bfloat16 represents exactly and compares with BF16Tolerances.
type BF16Attention interface{ AttentionBF16() bool }
