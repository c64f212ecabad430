"""The synthetic whole-body CT phantom: the cohorts every panseg test, benchmark and demo runs on (no Ray).

- `cohort`: a case rendered to HU and cohorts written in the nnU-Net raw layout (`make_case`, `write_cohort`)
- `plan`: what one case will be (size, spacing, orientation, kind), drawn before anything is painted
- `shapes`: the canvas addressed in body millimetres and the shapes painted on it
- `body`: the body wall, scanner table and skeleton
- `organs`: lungs, heart, the 13 FLARE22 organs, vessels, and distractors that are not lesions
- `lesions`: lesions and organ pseudo-labels

What `panseg.phantom` exported when it was one module is re-exported here, so
`from panseg.phantom import write_cohort` keeps working.
"""

from panseg.phantom.cohort import (ORIENTATIONS, CaseSummary, CohortSummary, LesionInfo, PhantomCase, Tissue,
                                   cohort_jobs, make_case, write_cohort)

__all__ = ["ORIENTATIONS", "CaseSummary", "CohortSummary", "LesionInfo", "PhantomCase", "Tissue", "cohort_jobs",
           "make_case", "write_cohort"]
