package model

// RowLosses returns the cross-entropy at each of the B·T positions of the
// last Forward (0 at ignored positions), computed on the model's device:
// the position-wise loss without downloading the [B·T, V] logits. After a
// Forward with a labelled head (LabelledHead) it holds the labelled rows
// only, in position order, and RowLosses returns nil.
func (m *Model[F]) RowLosses() []F {
	if m.acts == nil || m.head != nil {
		return nil
	}
	return append([]F(nil), m.acts.hostLoss...)
}
