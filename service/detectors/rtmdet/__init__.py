"""RTMDet modules mirroring mmdet names: layers, cspnext (backbone), pafpn (neck), head, ins_head, model, priors."""
