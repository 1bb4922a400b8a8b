"""
@article{Punjani2021,
  author    = {Punjani, Ali and Fleet, David J.},
  title     = {3D variability analysis: Resolving continuous flexibility and discrete heterogeneity from single particle cryo-EM},
  journal   = {Journal of Structural Biology},
  year      = {2021},
  volume    = {213},
  number    = {2},
  pages     = {107702},
  doi       = {http://dx.doi.org/10.1016/j.jsb.2021.107702}
}

@article{Punjani2023,
  author    = {Punjani, Ali and Fleet, David J.},
  title     = {3DFlex: determining structure and motion of flexible proteins from cryo-EM},
  journal   = {Nature Methods},
  year      = {2023},
  volume    = {20},
  number    = {6},
  pages     = {860--870},
  doi       = {http://dx.doi.org/10.1038/s41592-023-01853-8}
}
"""
