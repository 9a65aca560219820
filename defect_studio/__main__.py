from defect_studio.cli import main

raise SystemExit(main())
