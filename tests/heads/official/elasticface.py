"""A straight float64 port of fdbtrs/ElasticFace utils/losses.py (ElasticArcFace, ElasticCosFace) at commit
5496ec0643bfdcd5e6b53b885aa4e919e26ce442, for the tests. Two changes only: the margins come from ``generator``
(the head's own, reseeded per step), and ``margin[idicate_cosie]`` (B x 1 x 1, which torch 2.x's scatter_
refuses) is viewed as B x 1."""

import torch


def l2_norm(input, axis=1):
    norm = torch.norm(input, 2, axis, True)
    output = torch.div(input, norm)
    return output


def elastic_forward(embbedings, kernel, label, s, m, std, plus, variant, generator):
    """The official forward; ``kernel`` is D x C, as there."""
    embbedings = l2_norm(embbedings, axis=1)
    kernel_norm = l2_norm(kernel, axis=0)
    cos_theta = torch.mm(embbedings, kernel_norm)
    cos_theta = cos_theta.clamp(-1, 1)  # for numerical stability
    index = torch.where(label != -1)[0]
    m_hot = torch.zeros(index.size()[0], cos_theta.size()[1], device=cos_theta.device)
    margin = torch.normal(mean=m, std=std, size=label[index, None].size(), generator=generator)
    if plus:
        with torch.no_grad():
            distmat = cos_theta[index, label.view(-1)].detach().clone()
            _, idicate_cosie = torch.sort(distmat, dim=0, descending=True)
            margin, _ = torch.sort(margin, dim=0)
        m_hot.scatter_(1, label[index, None], margin[idicate_cosie].view(-1, 1))
    else:
        m_hot.scatter_(1, label[index, None], margin)
    if variant == "arc":
        cos_theta.acos_()
        cos_theta[index] += m_hot
        cos_theta.cos_().mul_(s)
        return cos_theta
    cos_theta[index] -= m_hot
    ret = cos_theta * s
    return ret
