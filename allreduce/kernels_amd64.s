#include "textflag.h"

// AVX2 versions of the per-element loops in frame.go; each processes n
// elements, n a multiple of 8 (the Go wrappers do the tail). The Go
// functions in frame.go are the reference these must match bit for bit
// (kernels_test.go).

// func addF32AVX2(dst, src *float32, n int)
TEXT ·addF32AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $3, CX
	JZ   done
loop:
	VMOVUPS (DI), Y0
	VADDPS  (SI), Y0, Y0 // dst first: NaN payloads propagate as in Go's dst += src
	VMOVUPS Y0, (DI)
	ADDQ    $32, SI
	ADDQ    $32, DI
	DECQ    CX
	JNZ     loop
done:
	VZEROUPPER
	RET

// bf16 rounding constants, broadcast into Y8..Y12 by each function:
//   Y8 = 1, Y9 = 0x7fff, Y10 = 0x40, Y11 = 0x7fffffff, Y12 = 0x7f800000
#define LOADCONSTS \
	MOVL $1, AX; MOVD AX, X8; VPBROADCASTD X8, Y8; \
	MOVL $0x7fff, AX; MOVD AX, X9; VPBROADCASTD X9, Y9; \
	MOVL $0x40, AX; MOVD AX, X10; VPBROADCASTD X10, Y10; \
	MOVL $0x7fffffff, AX; MOVD AX, X11; VPBROADCASTD X11, Y11; \
	MOVL $0x7f800000, AX; MOVD AX, X12; VPBROADCASTD X12, Y12

// ROUND rounds the 8 float32 bit patterns in Y0 to bf16 (nearest, ties to
// even; NaN stays a quiet NaN), leaving 8 uint16 in X2. Clobbers Y1-Y5.
#define ROUND \
	VPSRLD $16, Y0, Y1; \
	VPAND Y8, Y1, Y2; \
	VPADDD Y0, Y2, Y2; \
	VPADDD Y9, Y2, Y2; \
	VPSRLD $16, Y2, Y2; \
	VPOR Y10, Y1, Y3; \
	VPAND Y11, Y0, Y4; \
	VPCMPGTD Y12, Y4, Y4; \
	VPBLENDVB Y4, Y3, Y2, Y2; \
	VEXTRACTI128 $1, Y2, X5; \
	VPACKUSDW X5, X2, X2

// func addBF16EmitAVX2(dst *float32, ws *uint16, n int)
// dst[i] += widen(ws[i]); ws[i] = bf16(dst[i])
TEXT ·addBF16EmitAVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ ws+8(FP), SI
	MOVQ n+16(FP), CX
	LOADCONSTS
	SHRQ $3, CX
	JZ   done
loop:
	VPMOVZXWD (SI), Y0
	VPSLLD    $16, Y0, Y0
	VMOVUPS   (DI), Y6
	VADDPS    Y0, Y6, Y0 // dst first, as in Go
	VMOVUPS   Y0, (DI)
	ROUND
	VMOVDQU   X2, (SI)
	ADDQ      $32, DI
	ADDQ      $16, SI
	DECQ      CX
	JNZ       loop
done:
	VZEROUPPER
	RET

// func copyBF16AVX2(dst *float32, ws *uint16, n int)
TEXT ·copyBF16AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ ws+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $3, CX
	JZ   done
loop:
	VPMOVZXWD (SI), Y0
	VPSLLD    $16, Y0, Y0
	VMOVUPS   Y0, (DI)
	ADDQ      $32, DI
	ADDQ      $16, SI
	DECQ      CX
	JNZ       loop
done:
	VZEROUPPER
	RET

// func toBF16AVX2(dst *uint16, src *float32, n int)
TEXT ·toBF16AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	LOADCONSTS
	SHRQ $3, CX
	JZ   done
loop:
	VMOVUPS (SI), Y0
	ROUND
	VMOVDQU X2, (DI)
	ADDQ    $16, DI
	ADDQ    $32, SI
	DECQ    CX
	JNZ     loop
done:
	VZEROUPPER
	RET

// func finishBF16AVX2(dst *float32, ws *uint16, n int, div float32)
// The owner's last reduce step: v = dst + widen(ws); v /= div unless div is
// 0 (Sum); ws = bf16(v); dst = widen(ws).
TEXT ·finishBF16AVX2(SB), NOSPLIT, $0-28
	MOVQ         dst+0(FP), DI
	MOVQ         ws+8(FP), SI
	MOVQ         n+16(FP), CX
	MOVL         div+24(FP), DX
	VBROADCASTSS div+24(FP), Y7
	LOADCONSTS
	SHRQ         $3, CX
	JZ           done
loop:
	VPMOVZXWD (SI), Y0
	VPSLLD    $16, Y0, Y0
	VMOVUPS   (DI), Y6
	VADDPS    Y0, Y6, Y0
	TESTL     DX, DX
	JZ        round
	VDIVPS    Y7, Y0, Y0
round:
	ROUND
	VMOVDQU   X2, (SI)
	VPMOVZXWD X2, Y0
	VPSLLD    $16, Y0, Y0
	VMOVUPS   Y0, (DI)
	ADDQ      $32, DI
	ADDQ      $16, SI
	DECQ      CX
	JNZ       loop
done:
	VZEROUPPER
	RET
