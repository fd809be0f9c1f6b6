package cpu

import "github.com/bmojo/bmojo/kernels"

var _ kernels.AsyncCopier[float32] = (*Backend[float32])(nil)

// DownloadAsync implements kernels.AsyncCopier. Ops run on the calling
// goroutine, so the copy is done when it returns: it is Download.
func (be *Backend[F]) DownloadAsync(dst []F, src kernels.Buffer) func() error {
	be.Download(dst, src)
	return be.doneErr()
}

// UploadAsync implements kernels.AsyncCopier: it is Upload.
func (be *Backend[F]) UploadAsync(dst kernels.Buffer, src []F) func() error {
	be.Upload(dst, src)
	return be.doneErr()
}

// doneErr is the wait of a copy that has run, or did not because of the
// error Err reports.
func (be *Backend[F]) doneErr() func() error {
	err := be.Err()
	return func() error { return err }
}
